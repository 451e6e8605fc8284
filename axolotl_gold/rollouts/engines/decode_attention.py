"""Attention for one decode token that never expands the KV heads.

HF's ``sdpa`` path repeats every KV head ``num_attention_heads / num_key_value_heads``
times whenever a mask is passed (``repeat_kv``: torch's SDPA takes grouped heads only
without a mask), and the static engine always passes one. For a decode step that copy
is most of the attention's memory traffic: 7x the cache for Qwen2.5-0.5B's 14 query /
2 KV heads. Here the queries of one KV head are stacked as rows of one matrix, so each
cached key and value is read once::

    q [B, H, 1, D] -> [B, Hkv, H/Hkv, D];  scores = q @ K^T [B, Hkv, H/Hkv, L]
    scores and softmax in float32 (as SDPA's kernels), then @ V -> [B, 1, H, D]

On CUDA with a boolean mask (sdpa models) the same attention runs as two Triton
launches instead (``decode_kernel.flash_decode``: the cache read once in its own dtype,
only the blocks the mask lets through); ``kernel=False`` keeps the tensor version, which
also serves the CPU and the eager implementation's additive masks.

It is installed only around the static engine's decode step (``grouped_decode``) for
models that read HF's attention interface; anything it does not serve (more than one
query token, soft-capping, attention sinks) goes to the implementation it replaced.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from axolotl_gold.rollouts.engines import decode_kernel

_UNSERVED_KWARGS = ("softcap", "s_aux", "sinks")


def grouped_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``[B, Q, H, D]`` attention output for queries ``[B, H, Q, D]`` and cached
    keys / values ``[B, Hkv, L, D]``; ``mask`` is boolean (True = attend) or additive,
    broadcastable to ``[B, 1, Q, L]``."""
    batch, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    low = key.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device_type=query.device.type, enabled=False):
        # as SDPA's kernels compute: queries in the cache's dtype, scores accumulated and
        # kept in float32 (bf16 scores would round to 3 digits before the softmax)
        q = query.to(key.dtype)
        if low:
            q, k = q.float(), key.float()
        else:
            k = key
        # query head h reads KV head h // group (HF's repeat_kv order)
        q = q.reshape(batch, kv_heads, group * q_len, dim)
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, Hkv, G*Q, L]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling
        if mask is not None:
            scores = scores.view(batch, kv_heads, group, q_len, length)
            m = mask.reshape(mask.shape[0], 1, 1, mask.shape[-2], length)
            if m.dtype == torch.bool:
                scores = scores.masked_fill(~m, float("-inf"))
            else:
                scores = scores + m.to(scores.dtype)
            scores = scores.view(batch, kv_heads, group * q_len, length)
        probs = scores.softmax(dim=-1).to(value.dtype)
        out = torch.matmul(probs, value)  # [B, Hkv, G*Q, D]
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous()


_WRAPPED: dict = {}


def _wrap(original, kernel: bool):
    """The grouped attention in front of ``original``: one object per (``original``,
    ``kernel``), so a compiled decode step (which guards on the function it finds) is not
    recompiled."""
    if (original, kernel) not in _WRAPPED:
        _WRAPPED[original, kernel] = _make_wrapper(original, kernel)
    return _WRAPPED[original, kernel]


def _make_wrapper(original, kernel: bool):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        served = query.shape[2] == 1 and not any(kwargs.get(k) is not None for k in _UNSERVED_KWARGS)
        if not served:
            fallback = original or sys.modules[type(module).__module__].eager_attention_forward
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if kernel and decode_kernel.available(query, key, attention_mask):
            return decode_kernel.flash_decode(query, key, value, attention_mask, scale), None
        return grouped_decode_attention(query, key, value, attention_mask, scale), None

    return attention


@contextlib.contextmanager
def grouped_decode(model, kernel: bool = True):
    """Within the block, the model's attention implementation (sdpa or eager) is the
    grouped decode attention above for one-token queries (a local override of HF's
    attention interface, removed on exit); ``kernel``: the Triton version where it serves."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config.get_text_config(decoder=True)
    name = getattr(config, "_attn_implementation", None) or "eager"
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had_local, before = name in local, local.get(name)
    ALL_ATTENTION_FUNCTIONS[name] = _wrap(ALL_ATTENTION_FUNCTIONS.get(name), kernel)
    try:
        yield
    finally:
        if had_local:
            local[name] = before
        else:
            local.pop(name, None)
