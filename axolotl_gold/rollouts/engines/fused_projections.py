"""One GEMM for the projections that read the same input, while the static engine decodes.

At batch 16 a decode step's GEMMs move a few megabytes each and take a few microseconds:
their fixed cost, not the weights' bytes, bounds them. A Llama-family layer runs five of its
seven GEMMs in two groups on one input: the attention's ``q_proj`` / ``k_proj`` / ``v_proj``
and the MLP's ``gate_proj`` / ``up_proj``. Within ``fused_projections`` each group is one GEMM
on a concatenated copy of its weights (and biases): the group's first projection runs it and
returns its slice; the others return theirs, when they are called on the same input tensor
(anything else computes its own, as before: any call order stays right).

The copies are made once per model and refreshed (copied in place) on entry, so a trained
student's latest weights are used and a compiled, captured step keeps its buffers. Only
plain ``nn.Linear`` projections of one dtype and device are grouped (peft's LoRA layers,
quantized or sharded weights are left as they are). The copies cost memory: the grouped
weights once more (0.47 GB for Qwen2.5-0.5B, ~9 GB for an 8B).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Shared:
    """What a group's first projection computed: its input and the others' outputs."""

    def __init__(self):
        self.input = None
        self.outputs = ()


class _First(nn.Module):
    """The group's first projection: the group's GEMM, its own slice returned."""

    def __init__(self, linears: list[nn.Linear], shared: _Shared):
        super().__init__()
        weight = linears[0].weight
        rows = sum(m.out_features for m in linears)
        self.register_buffer("weight", torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device),
                             persistent=False)
        has_bias = linears[0].bias is not None
        self.register_buffer("bias", torch.empty(self.weight.shape[0], dtype=weight.dtype, device=weight.device)
                             if has_bias else None, persistent=False)
        # a plain list: the originals are not submodules here (the model's parameters keep their names)
        self.linears, self.sizes, self.shared = list(linears), [m.out_features for m in linears], shared

    @torch.no_grad()
    def refresh(self) -> None:
        torch.cat([m.weight for m in self.linears], out=self.weight)
        if self.bias is not None:
            torch.cat([m.bias for m in self.linears], out=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.shared.input, self.shared.outputs = x, rest
        return first


class _Rest(nn.Module):
    """A later projection of the group: its slice of the first one's GEMM on the same input."""

    def __init__(self, linear: nn.Linear, index: int, shared: _Shared):
        super().__init__()
        self.original, self.index, self.shared = (linear,), index, shared  # a tuple: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared.input is x:
            return self.shared.outputs[self.index]
        return self.original[0](x)


def _groupable(linears: list) -> bool:
    """Plain ``nn.Linear`` layers on one input width, dtype and device, biases all or none,
    with ordinary (not sharded, not gathered-on-demand) weights."""
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0]
    return all(
        m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
        and type(m.weight.data) is torch.Tensor and m.weight.shape == (m.out_features, m.in_features)
        for m in linears
    )


def _decoder(model) -> nn.Module:
    """The text decoder the decode steps run (a vision-language model's vision tower only
    runs in the prompt's prefill: no copies for it)."""
    try:
        return model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return model


def _build(model) -> list[tuple[nn.Module, list[str], list[nn.Module]]]:
    """Per group found in the text decoder: its parent module, the projections' names, and
    the modules that stand in for them."""
    found = []
    for parent in _decoder(model).modules():
        for names in GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if isinstance(linears[0], (_First, _Rest)) or not _groupable(linears):
                continue
            shared = _Shared()
            stand_ins = [_First(linears, shared)] + [_Rest(m, i, shared) for i, m in enumerate(linears[1:])]
            found.append((parent, list(names), stand_ins))
    return found


def _current(group) -> bool:
    """Whether a kept group still stands for its parent's projections: the same modules (not
    since replaced, e.g. wrapped by peft), weights of the copy's dtype, device and shape."""
    parent, names, stand_ins = group
    first = stand_ins[0]
    linears = [getattr(parent, name, None) for name in names]
    return all(m is kept for m, kept in zip(linears, first.linears)) and _groupable(linears) and (
        first.weight.dtype == linears[0].weight.dtype and first.weight.device == linears[0].weight.device
        and first.sizes == [m.out_features for m in linears])


def fused_groups(model) -> list:
    """The model's groups: made on first use and kept while the model lives and its
    projections stay the same modules of the same dtype and device (else made anew)."""
    if model not in _FUSED or not all(map(_current, _FUSED[model])):
        _FUSED[model] = _build(model)
    return _FUSED[model]


@contextlib.contextmanager
def fused_projections(model, enabled: bool = True):
    """Within the block (no gradients), each group of projections on one input is one GEMM on
    a copy of the weights taken on entry; the original modules are back on exit."""
    groups = fused_groups(model) if enabled else []
    installed = []  # the originals are each group's ``linears`` (``fused_groups`` checked them)
    try:
        for group in groups:
            parent, names, stand_ins = group
            stand_ins[0].refresh()
            installed.append(group)
            for name, module in zip(names, stand_ins):
                parent._modules[name] = module
        yield len(groups)
    finally:
        for parent, names, stand_ins in installed:
            for name, module in zip(names, stand_ins[0].linears):
                parent._modules[name] = module
            stand_ins[0].shared.input, stand_ins[0].shared.outputs = None, ()
