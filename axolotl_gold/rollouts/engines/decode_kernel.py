"""Decode attention as two Triton launches (split-KV "flash decoding"), for the static
engine's one-token steps on CUDA.

The tensor version (``decode_attention.grouped_decode_attention``) reads the cache well
once per KV head, but in five kernels that each go through memory, and it first copies
the whole key cache to float32 (the scores must not round to bf16) and reads every
cache column, filled or not. Here one program per (row, KV head, split of
``SPLIT`` columns):

- loads the group's queries once (``GROUP`` query heads of a KV head, padded to 16 rows
  for ``tl.dot``), rounded to the cache's dtype as the tensor version casts them;
- walks its columns in blocks of ``BLOCK_N``, skipping any block with no column the
  boolean mask lets through (left padding, cache columns not written yet: a step early
  in a rollout reads only the columns filled so far);
- keeps an online softmax (running max, sum and ``[GROUP, D]`` accumulator in float32:
  scores are float32 dot products of the cache-dtype values, as SDPA's kernels and the
  tensor version compute them), and writes its partial result.

Products: a float32 cache gets IEEE float32 ``tl.dot`` (no TF32) throughout. A 16-bit
cache (bf16 / fp16, what the engine decodes with) takes tensor cores: the scores are a
16-bit ``tl.dot`` with float32 accumulation, whose products of 16-bit values are exact in
float32 (the same numbers as the float32 product, summed in another order); the
probabilities meet the values in a TF32 ``tl.dot`` (probabilities rounded to 10 bits,
the values exact), where the tensor version and SDPA's kernels round them to the values'
8 (bf16) bits. The IEEE float32 products of 16-bit caches ran on CUDA cores: 8.9 us of a
layer's step on an H100 at 16 rows x 1,024 columns, several times the cache read.

The second launch combines a row's splits (``exp(m_s - max)`` weights). A row with no
column to attend (never the case in the engine: the new token always attends to itself)
gets zeros where the tensor version gives NaN.

Fixed reduction order: a row's output does not depend on the batch it is in.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

BLOCK_N = 64  # cache columns per loop step
MIN_ROWS = 16  # tl.dot's smallest M: the group's queries are padded to it
TARGET_SPLITS = 16  # splits per (row, KV head) for a long cache


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def available(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernels serve these inputs: CUDA (or Triton's interpreter), one query
    token, a float cache, and no mask or a boolean one (the eager implementation's
    additive masks go to the tensor version)."""
    if triton is None or query.shape[2] != 1:
        return False
    if key.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if mask is not None and mask.dtype != torch.bool:
        return False
    return key.is_cuda or _interpreting()


def tensor_cores(key: torch.Tensor) -> bool:
    """Whether the split kernel's products take tensor cores: a 16-bit cache on CUDA.
    (Triton's interpreter reads a 16-bit ``tl.dot``'s operands as raw integers: it runs
    the float32 products.)"""
    return key.dtype != torch.float32 and not _interpreting()


def split_columns(length: int) -> int:
    """Columns per program: a power-of-two multiple of ``BLOCK_N`` giving about
    ``TARGET_SPLITS`` splits."""
    blocks = max(1, -(-length // (BLOCK_N * TARGET_SPLITS)))
    return BLOCK_N * (1 << (blocks - 1).bit_length())


if triton is not None:

    @triton.jit
    def _split_kernel(
        Q, K, V, M, OUT, STATS,
        sqb, sqh, sqd,
        skb, skh, skl, skd,
        svb, svh, svl, svd,
        smb, sml,
        kv_heads, length, splits, scale,
        HAS_MASK: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK: tl.constexpr, TENSOR_CORES: tl.constexpr,
    ):
        row_head = tl.program_id(0)
        split = tl.program_id(1)
        b = row_head // kv_heads
        h = row_head % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_in = g < GROUP
        d_in = d < DIM
        q = tl.load(Q + b * sqb + (h * GROUP + g)[:, None] * sqh + d[None, :] * sqd,
                    mask=g_in[:, None] & d_in[None, :], other=0.0)
        q = q.to(K.dtype.element_ty)  # the cache's precision, as the tensor version
        if not TENSOR_CORES:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        for start in range(0, SPLIT, BLOCK):
            cols = split * SPLIT + start + tl.arange(0, BLOCK)
            inside = cols < length
            if HAS_MASK:
                attend = (tl.load(M + b * smb + cols * sml, mask=inside, other=0) != 0) & inside
            else:
                attend = inside
            if tl.max(attend.to(tl.int32), axis=0) > 0:
                kv_mask = attend[:, None] & d_in[None, :]
                k = tl.load(k_base + cols[:, None] * skl + d[None, :] * skd, mask=kv_mask, other=0.0)
                v = tl.load(v_base + cols[:, None] * svl + d[None, :] * svd, mask=kv_mask, other=0.0)
                if TENSOR_CORES:  # 16-bit cache: exact products, float32 sums
                    s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
                else:
                    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
                # (under torch.compile a Python float arrives as float64: back to float32)
                s = tl.where(attend[None, :], (s * scale).to(tl.float32), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if TENSOR_CORES:  # probabilities rounded to TF32 (10 bits; the values' 8 or 11 exact)
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                m_i = m_new
        heads = h * GROUP + g
        base = (b * kv_heads * GROUP + heads) * splits + split
        tl.store(OUT + base[:, None] * BLOCK_D + d[None, :], acc, mask=g_in[:, None])
        tl.store(STATS + base * 2, m_i, mask=g_in)
        tl.store(STATS + base * 2 + 1, l_i, mask=g_in)

    @triton.jit
    def _combine_kernel(OUT, STATS, O, splits, sob, soh, sod, heads,
                        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        row_head = tl.program_id(0)
        b = row_head // heads
        h = row_head % heads
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_in = s < splits
        base = row_head * splits + s
        m = tl.load(STATS + base * 2, mask=s_in, other=float("-inf"))
        l = tl.load(STATS + base * 2 + 1, mask=s_in, other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(l > 0, tl.exp(m - top), 0.0)
        acc = tl.load(OUT + base[:, None] * BLOCK_D + d[None, :], mask=s_in[:, None], other=0.0)
        total = tl.sum(acc * w[:, None], axis=0)
        denom = tl.sum(l * w, axis=0)
        out = tl.where(denom > 0, total / tl.where(denom > 0, denom, 1.0), 0.0)
        tl.store(O + b * sob + h * soh + d * sod, out.to(O.dtype.element_ty), mask=d < DIM)


def flash_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``[B, 1, H, D]`` attention output (the values' dtype) for one query token per row:
    queries ``[B, H, 1, D]``, cached keys / values ``[B, Hkv, L, D]``, ``mask`` boolean
    (True = attend) broadcastable to ``[B, 1, 1, L]`` or None."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    split = split_columns(length)
    splits = -(-length // split)
    block_d = triton.next_power_of_2(dim)
    device = query.device
    partial = torch.empty((batch * heads * splits, block_d), dtype=torch.float32, device=device)
    stats = torch.empty((batch * heads * splits, 2), dtype=torch.float32, device=device)
    out = torch.empty((batch, 1, heads, dim), dtype=value.dtype, device=device)
    if mask is None:
        m, smb, sml = key, 0, 0  # not read
    else:
        m = mask.reshape(mask.shape[0], mask.shape[-1])
        smb = m.stride(0) if m.shape[0] > 1 else 0
        sml = m.stride(1)
    _split_kernel[(batch * kv_heads, splits)](
        query, key, value, m, partial, stats,
        query.stride(0), query.stride(1), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3),
        smb, sml,
        kv_heads, length, splits, scaling,
        HAS_MASK=mask is not None, GROUP=group, BLOCK_G=max(MIN_ROWS, triton.next_power_of_2(group)),
        DIM=dim, BLOCK_D=block_d, SPLIT=split, BLOCK=BLOCK_N, TENSOR_CORES=tensor_cores(key),
        num_warps=4,
    )
    _combine_kernel[(batch * heads,)](
        partial, stats, out, splits, out.stride(0), out.stride(2), out.stride(3), heads,
        DIM=dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4,
    )
    return out
