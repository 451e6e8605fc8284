"""What the static-cache engine needs from a model, and when it cannot serve one.

Facts about HF models the engine must respect:

- Under autocast (Accelerate wraps a float32 student's forward in it for ``bf16`` /
  ``fp16`` training) the value projection comes out in the autocast dtype while RoPE
  promotes the keys back to float32. HF's ``StaticLayer`` allocates both buffers in the
  keys' dtype, so the first value write fails (``index_copy_(): self and source expected
  to have the same dtype``). Attention computes in the values' dtype either way (autocast
  casts its inputs), so the cache stores keys and values in the values' dtype.
- ``StaticLayer`` writes every row at one shared position; the engine's slots each write
  at their own column (a slot may start a new prompt while others go on), so a decode
  step's cache layer writes each row's key and value at ``write_at[row]``. Under
  ``torch.compile`` the write is an indexed assignment (``index_put_``, rows by an
  ``arange`` made inside the graph), which inductor keeps in place; a ``scatter_`` is
  functionalized to an out-of-place scatter plus a copy back, which rewrote every layer's
  whole key and value cache each compiled step. Eagerly ``scatter_`` writes in place.
  (A row-index tensor read by the captured graph instead gave wrong rows on CUDA after a
  refill: ``tests/gpu/cuda_tests_h100_run23.md``.)
- A 4-D mask is handed to attention unchanged: ``sdpa`` reads a boolean mask, ``eager``
  *adds* the mask to its scores, so it needs ``0`` / ``-inf``-like floats.
- Axolotl keeps a full fine-tune's ``embed_tokens`` / ``lm_head`` in float32 under bf16
  autocast, so every decode step would cast the float32 head to bf16 again (autocast
  caches no cast inside a CUDA graph): 545 MB read and 272 MB written a token for a
  151,936 x 896 head. ``autocast_head`` runs the prefill's head under a probe that
  records the autocast dtype, and ``precast_head`` then gives the head a copy in it for
  the call's decode steps (the same rounding autocast applies, so the same logits).
- Sliding-window layers keep a ring buffer of ``sliding_window`` columns whose masks HF
  builds itself; a full-width 4-D mask does not fit them. When the window is at least the
  whole sequence, sliding attention equals full attention and full layers serve.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# attention implementations whose 4-D mask convention the decode step knows
SERVED_ATTENTION = ("sdpa", "eager")


class ComputeDtypeLayer:
    """Mixin for HF's ``StaticLayer``: keys stored in the values' dtype (see above), and,
    once ``write_at`` is set (a decode step's cache), one token per row written at that
    row's own column (``write_at[row]``) instead of HF's one shared write position."""

    write_at: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states.to(value_states.dtype), value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        dtype = self.dtype if self.is_initialized else value_states.dtype
        if self.write_at is None:
            return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)
        compiling = torch.compiler.is_compiling()
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            if compiling:  # kept in place by inductor; the row index a constant of the graph
                rows = torch.arange(store.shape[0], device=store.device)
                store[rows, :, self.write_at] = new[:, :, 0].to(dtype)
            else:
                index = self.write_at.view(-1, 1, 1, 1).expand(-1, store.shape[1], 1, store.shape[3])
                store.scatter_(2, index, new.to(dtype))
        return self.keys, self.values


_LAYER_CLASS = {}


def _layer_class():
    """``ComputeDtypeLayer`` over HF's ``StaticLayer``, made once: a compiled decode step
    guards on its layers' class, and a class made per cache recompiled every new cache."""
    if "cls" not in _LAYER_CLASS:
        from transformers.cache_utils import StaticLayer

        _LAYER_CLASS["cls"] = type("ComputeDtypeStaticLayer", (ComputeDtypeLayer, StaticLayer), {})
    return _LAYER_CLASS["cls"]


def static_cache(config, max_cache_len: int):
    """HF's ``StaticCache`` for ``config`` with every layer a full-attention ``ComputeDtypeLayer``.

    Only called when ``blocker`` returned None, so sliding layers (if any) span the
    whole sequence and are full layers in effect.
    """
    from transformers import StaticCache

    layer_cls = _layer_class()
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [layer_cls(max_cache_len=max_cache_len) for _ in cache.layers]
    return cache


def compact_cache(cache, keep: torch.Tensor) -> None:
    """Keep only the batch rows ``keep`` of every layer (rows that stopped sampling are
    dropped; each kept row's write column goes with it: ``DecodeStep.compact``)."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        layer.keys = layer.keys.index_select(0, keep)
        layer.values = layer.values.index_select(0, keep)
        if hasattr(layer, "batch_size"):
            layer.batch_size = int(keep.numel())


def copy_cache_rows(source, target, keep: torch.Tensor) -> None:
    """Rows ``keep`` of ``source``'s layers into ``target``'s (built for ``len(keep)`` rows
    and the same columns), in place: ``target``'s tensors keep their addresses."""
    for src, dst in zip(source.layers, target.layers):
        if not getattr(src, "is_initialized", False):
            continue
        keys, values = src.keys.index_select(0, keep), src.values.index_select(0, keep)
        if not dst.is_initialized:
            dst.lazy_initialization(keys, values)
        dst.keys.copy_(keys)
        dst.values.copy_(values)
        # HF's shared write position: unused by the per-row writes (``write_at``), copied so
        # the layer reads as its source would (HF's ``get_seq_length``)
        dst.cumulative_length.copy_(src.cumulative_length)


def place_prompt_rows(source, target, slots: torch.Tensor, batch: int) -> None:
    """``source``'s rows (prefilled prompts, ``width`` columns) into rows ``slots`` of
    ``target``'s layers (``batch`` rows), columns ``[0, width)``, in place; ``target``'s
    layers are allocated on first use."""
    for src, dst in zip(source.layers, target.layers):
        if not dst.is_initialized:
            shape = (batch, src.keys.shape[1], 1)
            dst.lazy_initialization(src.keys[:1, :, :1].expand(*shape, -1), src.values[:1, :, :1].expand(*shape, -1))
        width = src.keys.shape[2]
        dst.keys[slots, :, :width] = src.keys.to(dst.keys.dtype)
        dst.values[slots, :, :width] = src.values.to(dst.values.dtype)


def attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def blocker(model, total_len: int) -> str | None:
    """Why the static engine cannot serve ``model`` for ``total_len`` columns, or None."""
    from axolotl_gold.data.attention_span import layout_blocker

    attention = attention_implementation(model)
    if attention not in (None, *SERVED_ATTENTION):
        return f"attention implementation `{attention}` (the static engine serves sdpa and eager)"
    return layout_blocker(model.config, total_len)


def position_blocker(model) -> str | None:
    """Why the static engine cannot serve ``model`` with images, or None: a model that
    places its own rotary positions for images (Qwen2-VL's 3-D "mrope", through
    ``get_rope_index``) needs them in every decode step, where the engine passes 1-D ones."""
    if any(hasattr(module, "get_rope_index") for module in model.modules()):
        return "image prompts of a model with its own rotary positions (`get_rope_index`, e.g. Qwen2-VL)"
    return None


def attention_mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean ``[B, 1, 1, L]`` mask in the form the model's attention reads."""
    if attention_implementation(model) != "eager":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def _plain_head(model) -> nn.Linear | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None


class HeadProbe:
    """A forward pre-hook on the output head: the autocast dtype the head computed in at its
    last call (None outside autocast or before a call)."""

    def __init__(self):
        self.autocast_dtype = None

    def __call__(self, module, args):
        device = module.weight.device.type
        self.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


@contextlib.contextmanager
def autocast_head(model):
    """Within the block, calls of the model's plain ``nn.Linear`` head record the autocast
    dtype they run in (yields the ``HeadProbe``)."""
    probe, head = HeadProbe(), _plain_head(model)
    handle = head.register_forward_pre_hook(probe) if head is not None else None
    try:
        yield probe
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def precast_head(model, dtype: torch.dtype | None):
    """Within the block (no gradients), a float32 plain head computes from a copy of its
    weight and bias in ``dtype`` (the autocast dtype ``autocast_head`` saw; None: nothing
    changes); the parameters, tied or not, are back on exit."""
    head = _plain_head(model)
    if dtype is None or head is None or head.weight.dtype != torch.float32 or dtype == torch.float32:
        yield
        return
    params = {name: p for name, p in (("weight", head.weight), ("bias", head.bias)) if p is not None}
    for name, param in params.items():
        setattr(head, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    try:
        yield
    finally:
        for name, param in params.items():
            setattr(head, name, param)
