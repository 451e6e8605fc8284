"""What the static-cache engine needs from a model, and when it cannot serve one.

Three facts about HF models the engine must respect:

- Under autocast (Accelerate wraps a float32 student's forward in it for ``bf16`` /
  ``fp16`` training) the value projection comes out in the autocast dtype while RoPE
  promotes the keys back to float32. HF's ``StaticLayer`` allocates both buffers in the
  keys' dtype, so the first value write fails (``index_copy_(): self and source expected
  to have the same dtype``). Attention computes in the values' dtype either way (autocast
  casts its inputs), so the cache stores keys and values in the values' dtype.
- A 4-D mask is handed to attention unchanged: ``sdpa`` reads a boolean mask, ``eager``
  *adds* the mask to its scores, so it needs ``0`` / ``-inf``-like floats.
- Sliding-window layers keep a ring buffer of ``sliding_window`` columns whose masks HF
  builds itself; a full-width 4-D mask does not fit them. When the window is at least the
  whole sequence, sliding attention equals full attention and full layers serve.
"""

from __future__ import annotations

import torch

# attention implementations whose 4-D mask convention the decode step knows
SERVED_ATTENTION = ("sdpa", "eager")


class ComputeDtypeLayer:
    """Mixin for HF's ``StaticLayer``: keys stored in the values' dtype (see above)."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states.to(value_states.dtype), value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        dtype = self.dtype if self.is_initialized else value_states.dtype
        return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)


def static_cache(config, max_cache_len: int):
    """HF's ``StaticCache`` for ``config`` with every layer a full-attention ``ComputeDtypeLayer``.

    Only called when ``blocker`` returned None, so sliding layers (if any) span the
    whole sequence and are full layers in effect.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    layer_cls = type("ComputeDtypeStaticLayer", (ComputeDtypeLayer, StaticLayer), {})
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [layer_cls(max_cache_len=max_cache_len) for _ in cache.layers]
    return cache


def compact_cache(cache, keep: torch.Tensor) -> None:
    """Keep only the batch rows ``keep`` of every layer (rows that stopped sampling are
    dropped; the write position is shared by all rows and stays)."""
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
        dst.cumulative_length.copy_(src.cumulative_length)


def attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def blocker(model, total_len: int) -> str | None:
    """Why the static engine cannot serve ``model`` for ``total_len`` columns, or None."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    attention = attention_implementation(model)
    if attention not in (None, *SERVED_ATTENTION):
        return f"attention implementation `{attention}` (the static engine serves sdpa and eager)"
    config = model.config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = set(layer_types) - {"full_attention"}
    if other - {"sliding_attention"}:
        return f"layer types {sorted(other)}"
    window = getattr(config, "sliding_window", None)
    if other and window is not None and window < total_len:
        return f"sliding_window {window} < prompt + completion columns {total_len}"
    return None


def attention_mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean ``[B, 1, 1, L]`` mask in the form the model's attention reads."""
    if attention_implementation(model) != "eager":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
