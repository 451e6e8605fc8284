"""Gradient buffers of the student's own, for a student compiled with CUDA graphs.

Under ``torch_compile_mode: reduce-overhead`` (or ``max-autotune``) inductor records the
student's backward as a CUDA graph (cudagraph trees) whose outputs, the parameters'
gradients, live in the graph's memory pool. When a parameter has no ``.grad`` yet, autograd
installs the backward's output tensor itself as ``.grad``; the next micro-batch's replay of
the same graph writes its own gradients into that memory. Accumulating over micro-batches
then reads overwritten memory: torch raises "accessing tensor output of CUDAGraphs that has
been overwritten by a subsequent run" (pytorch/pytorch#169545), or, where the check does not
fire, the sum is silently wrong.

``own_grad_buffers`` gives every trainable parameter without one a zero ``.grad`` allocated
outside the graphs' pool before the backward; autograd then adds each micro-batch's
gradient into it in place, as it does from the second micro-batch on in eager mode. The
cost is one zero fill of the gradients per optimizer step, and the gradients held from the
first micro-batch's forward instead of from its backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def own_grad_buffers(params: Iterable[torch.nn.Parameter]) -> int:
    """Give each trainable parameter without a ``.grad`` a zero one (its own memory, in the
    parameter's dtype and layout); returns how many it gave."""
    given = 0
    with torch.no_grad():
        for param in params:
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param, memory_format=torch.preserve_format)
                given += 1
    return given
