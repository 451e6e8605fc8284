"""The student's training step without cuDNN's attention kernels.

torch (2.11 on) picks cuDNN's fused attention for ``scaled_dot_product_attention`` with a
mask in bf16 / fp16 on H100 and H200. Its backward returns NaN in the query gradient when the
sequence length is 64 more than a multiple of 128 (64, 192, 320, ...) and some query row's
log-sum-exp is below about -88.7 (pytorch/pytorch#196678; huggingface/trl#7181): the padded
half of the last 128-wide key tile is scored 0 instead of -inf, ``exp(0 - lse)`` overflows,
and ``inf * 0`` is NaN. A left-padded scoring batch has such rows at every padding position
(a pad query attends to nothing: its log-sum-exp is -inf), so on those GPUs one micro-batch
width in 128 turns the whole step's gradients to NaN; with ``gold_scoring_width_multiple: 64``
(the default under CUDA graphs) every other width did. The forward is right; only the
backward is wrong, so only the student's step (its forward, the loss and the backward,
including gradient checkpointing's recomputation inside the backward) runs with cuDNN's
kernels turned off; torch then picks memory-efficient or flash attention, as it does on
other GPUs. The teacher's forward inside the step goes without them too (one switch around
the step is what reaches the recomputation); evaluation and the engines keep them.
"""

from __future__ import annotations

import contextlib

import torch

# the switch GPU probes flip to show the NaN again (benchmarks/probe_graphed_cli.py)
EXCLUDE_CUDNN_ATTENTION = True


@contextlib.contextmanager
def training_attention():
    """cuDNN's scaled-dot-product attention off inside (the other backends as they were),
    restored on exit."""
    if not EXCLUDE_CUDNN_ATTENTION:
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
