"""One GEMM for the projections that read the same input, while the static engine decodes.

At batch 16 a decode step's GEMMs move a few megabytes each and take a few microseconds:
their fixed cost, not the weights' bytes, bounds them. A Llama-family layer runs five of its
seven GEMMs in two groups on one input: the attention's ``q_proj`` / ``k_proj`` / ``v_proj``
and the MLP's ``gate_proj`` / ``up_proj``. Within ``fused_projections`` each group is one GEMM
on a concatenated copy of its weights (and biases): the group's first projection runs it and
returns its slice; the others return theirs, when they are called on the same input tensor
(anything else computes its own, as before: any call order stays right).

The copies are made once per model and refreshed (copied in place) on entry, so a trained
student's latest weights are used and a compiled, captured step keeps its buffers. Grouped
are plain ``nn.Linear`` projections of one dtype and device, and peft's LoRA ``Linear``
around such a projection (one active adapter, plain LoRA: no DoRA or other variant, not
merged). A LoRA member keeps its adapter's math, ``base(x) + B(A(x)) * scaling`` in the
result's dtype, in three GEMMs a group: the base weights', the ``A`` matrices' (stacked), and
the ``B`` matrices' (times their scaling, block-diagonal: a plain member's columns add exact
zeros), each on a copy refreshed per call. (The scaling multiplies ``B`` before the product
instead of after: the same numbers when it is a power of two, as ``lora_alpha`` = 2 x or 1 x
``lora_r`` gives; rounding apart otherwise.) Quantized or sharded weights
are left as they are. Axolotl's LoRA kernels (``apply_qkv`` bound to its LoRA kernel, the
MLP's ``forward`` replaced) read the projections' parameters, not their modules: within the
block those layers run their plain forward (the same math) so that the groups apply. The
copies cost memory: the grouped base weights once more (0.47 GB for Qwen2.5-0.5B, ~9 GB for
an 8B).
"""

from __future__ import annotations

import contextlib
import types
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


def _lora_adapter(module) -> str | None:
    """The active adapter of a plain peft LoRA ``Linear`` (one adapter, vanilla LoRA, not
    merged, its A and B plain linears, A without bias, dropout off or a plain dropout), or None."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is Axolotl's dependency
        return None
    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return None
    adapters = list(module.active_adapters)
    if len(adapters) != 1 or adapters[0] not in module.lora_A or adapters[0] in module.lora_variant:
        return None
    name = adapters[0]
    a, b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or getattr(module, "fan_in_fan_out", False):
        return None
    if not isinstance(module.scaling.get(name), (int, float)):
        return None
    if type(dropout) not in (nn.Identity, nn.Dropout) or type(a.weight.data) is not torch.Tensor:
        return None
    return name


def _base(module) -> nn.Module:
    """The projection's own linear: the module itself, or a LoRA layer's base layer."""
    return module.base_layer if _lora_adapter(module) is not None else module


class _First(nn.Module):
    """The group's first projection: the group's GEMM (and, with LoRA members, the stacked
    ``A`` and block-diagonal ``B`` GEMMs), its own slice returned."""

    def __init__(self, linears: list[nn.Module], shared: _Shared):
        super().__init__()
        bases = [_base(m) for m in linears]
        weight = bases[0].weight
        rows = sum(m.out_features for m in bases)
        self.register_buffer("weight", torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device),
                             persistent=False)
        has_bias = bases[0].bias is not None
        self.register_buffer("bias", torch.empty(self.weight.shape[0], dtype=weight.dtype, device=weight.device)
                             if has_bias else None, persistent=False)
        # plain lists: the originals are not submodules here (the model's parameters keep their names)
        self.linears, self.bases, self.sizes, self.shared = list(linears), bases, [m.out_features for m in bases], shared
        adapters = [_lora_adapter(m) for m in linears]
        self.loras = [(i, m, name) for i, (m, name) in enumerate(zip(linears, adapters)) if name is not None]
        a_weights = [m.lora_A[name].weight for _, m, name in self.loras]
        self.ranks = [w.shape[0] for w in a_weights]
        a = dict(dtype=a_weights[0].dtype, device=a_weights[0].device) if self.loras else None
        # the A matrices stacked; the B matrices (times their scaling) block-diagonal: row block
        # of each LoRA member's outputs, column block of its rank, zeros elsewhere
        self.register_buffer("lora_a", torch.empty(sum(self.ranks), weight.shape[1], **a) if a else None,
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(rows, sum(self.ranks), **a) if a else None, persistent=False)
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        columns = [sum(self.ranks[:k]) for k in range(len(self.ranks))]
        self.b_blocks = [(slice(starts[i], starts[i] + self.sizes[i]), slice(c, c + r))
                         for (i, _, _), c, r in zip(self.loras, columns, self.ranks)]
        self.signature = _signature(linears)

    @torch.no_grad()
    def refresh(self) -> None:
        torch.cat([m.weight for m in self.bases], out=self.weight)
        if self.bias is not None:
            torch.cat([m.bias for m in self.bases], out=self.bias)
        if self.loras:
            torch.cat([m.lora_A[name].weight for _, m, name in self.loras], out=self.lora_a)
            for (_, m, name), (rows, columns) in zip(self.loras, self.b_blocks):
                torch.mul(m.lora_B[name].weight, m.scaling[name], out=self.lora_b[rows, columns])

    def _dropping(self) -> bool:
        """Whether a LoRA member's dropout is on (training mode, p > 0): it draws per projection."""
        dropouts = (m.lora_dropout[name] for _, m, name in self.loras)
        return any(type(d) is nn.Dropout and d.training and d.p > 0 for d in dropouts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dropping():
            outputs = [m(x) for m in self.linears]  # each projection its own, as without the block
        else:
            result = F.linear(x, self.weight, self.bias)
            if self.loras:
                # peft's: the base result; the input cast to A's dtype; + B(A(x)) * scaling; the result's dtype.
                # Three GEMMs a group: the plain members' columns get exact zeros from the block-diagonal B.
                lora_x = self.loras[0][1]._cast_input_dtype(x, self.lora_a.dtype)
                result = (result + F.linear(F.linear(lora_x, self.lora_a), self.lora_b)).to(result.dtype)
            outputs = list(result.split(self.sizes, dim=-1))
        first, *rest = outputs
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
    """Plain ``nn.Linear`` layers (or plain LoRA layers around them) on one input width,
    dtype and device, biases all or none, with ordinary (not sharded, not gathered-on-demand)
    weights; the LoRA members' ``A`` of one dtype and device, their input casts alike."""
    if any(m is None for m in linears):
        return False
    bases = [_base(m) for m in linears]
    if not all(type(m) is nn.Linear for m in bases):
        return False
    first = bases[0]
    if not all(
        m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
        and type(m.weight.data) is torch.Tensor and m.weight.shape == (m.out_features, m.in_features)
        for m in bases
    ):
        return False
    loras = [(m, _lora_adapter(m)) for m in linears if _lora_adapter(m) is not None]
    if not loras:
        return True
    a = loras[0][0].lora_A[loras[0][1]].weight
    return all(
        w.dtype == a.dtype and w.device == a.device and type(w.data) is torch.Tensor
        and getattr(m, "cast_input_dtype_enabled", True) == getattr(loras[0][0], "cast_input_dtype_enabled", True)
        for m, name in loras for w in (m.lora_A[name].weight, m.lora_B[name].weight)
    ) and all(m.lora_B[name].bias is None for m, name in loras)


def _signature(linears: list) -> tuple:
    """What a group's copies were made for: each projection's base dtype, device and width,
    and its LoRA adapter, rank and ``A`` dtype."""
    out = []
    for m in linears:
        base, name = _base(m), _lora_adapter(m)
        a = m.lora_A[name].weight if name is not None else None
        out.append((base.weight.dtype, base.weight.device, base.out_features, name,
                    None if a is None else (a.shape[0], a.dtype)))
    return tuple(out)


# Axolotl's LoRA kernels (`lora_qkv_kernel`, `lora_mlp_kernel`: on by default for LoRA) bind
# functions that read the projections' parameters instead of calling their modules. Within
# the block a group's parent runs the model's plain forward instead (the same math, through
# the stand-ins): ``apply_qkv`` calls the modules, a replaced MLP ``forward`` is set aside.
_AXOLOTL_QKV = ("apply_lora_qkv", "original_apply_qkv")
_AXOLOTL_MLP = ("apply_lora_mlp_swiglu", "apply_lora_mlp_geglu")


def _plain_qkv(self, hidden_states):
    return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


def _overrides(parent: nn.Module, names: list[str]) -> dict | None:
    """Instance attributes to set on ``parent`` for the block (``None``: remove), or None when
    an unknown replacement of its forward path would bypass the stand-ins."""
    patched = {k: v for k, v in vars(parent).items() if k in ("forward", "apply_qkv")}
    out = {}
    for key, value in patched.items():
        func = getattr(value, "__func__", value)
        name = getattr(func, "__name__", "")
        if key == "apply_qkv" and names[0] == "q_proj" and name in _AXOLOTL_QKV:
            out[key] = types.MethodType(_plain_qkv, parent)
        elif key == "forward" and names[0] == "gate_proj" and name in _AXOLOTL_MLP:
            out[key] = None
        else:
            return None
    return out


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
    since replaced, e.g. wrapped by peft), weights of the copy's dtype, device and shape, the
    same LoRA adapters (not since merged, disabled or switched)."""
    parent, names, stand_ins = group
    first = stand_ins[0]
    linears = [getattr(parent, name, None) for name in names]
    return (all(m is kept for m, kept in zip(linears, first.linears)) and _groupable(linears)
            and _signature(linears) == first.signature)


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
            overrides = _overrides(parent, names)
            if overrides is None:
                continue
            stand_ins[0].refresh()
            installed.append((group, {key: vars(parent)[key] for key in overrides}))
            for key, value in overrides.items():
                if value is None:
                    del parent.__dict__[key]
                else:
                    parent.__dict__[key] = value
            for name, module in zip(names, stand_ins):
                parent._modules[name] = module
        yield len(installed)
    finally:
        for (parent, names, stand_ins), saved in installed:
            for name, module in zip(names, stand_ins[0].linears):
                parent._modules[name] = module
            parent.__dict__.update(saved)
            stand_ins[0].shared.input, stand_ins[0].shared.outputs = None, ()
