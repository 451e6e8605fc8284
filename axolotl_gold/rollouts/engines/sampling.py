"""Token sampling on the device for the static engine: no host sync, one uniform per row.

``filter_logits`` is the plain reference: HF's warpers (temperature, then top-k, then
top-p with ``TopPLogitsWarper``'s rule) as ``-inf`` masks over the vocabulary.

``sample_tokens`` draws from the same distribution by inverting its CDF, in vocabulary
order, at one uniform ``u`` per row (``noise.row_uniforms``). The nucleus is a floor on
the logits: a token stays when the mass of the tokens strictly more likely than it is
``< top_p`` (HF removes a token when the ascending cumulative mass up to it is
``<= 1 - top_p``); tokens tied at the floor all stay, where HF's sort keeps an
arbitrary part of them. On CUDA the floor is found without sorting (``nucleus.py``: a
k-ary search over the logits' bits, a few Triton launches); elsewhere by one sort of the
logits. Top-k is a floor too (the k-th largest logit, ties kept, as HF).
"""

from __future__ import annotations

import torch

from axolotl_gold.rollouts.engines import nucleus
from axolotl_gold.rollouts.engines.base import SamplingSettings


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``[B, V]`` float32 logits warped as HF does (temperature, then top-k, then top-p).

    Removed tokens get ``-inf``; the most likely token always survives.
    """
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1.0 - top_p  # HF's TopPLogitsWarper rule
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    sampling: SamplingSettings,
    uniforms: torch.Tensor | torch.Generator | None,
    fused: bool | None = None,
) -> torch.Tensor:
    """``[B]`` next tokens from ``[B, V]`` logits: argmax when greedy, else a sample of
    ``softmax(filter_logits(logits))`` by inverse CDF in vocabulary order.

    ``uniforms``: ``[B]`` draws in ``(0, 1)`` (``noise.row_uniforms``), or a generator to
    draw them from. ``fused``: the Triton kernels (``nucleus.py``; default: where they
    run) or the plain tensor version.
    """
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    batch, vocab = logits.shape
    if not isinstance(uniforms, torch.Tensor):
        device = uniforms.device if uniforms is not None else logits.device
        uniforms = torch.rand(batch, generator=uniforms, dtype=torch.float64, device=device)
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if fused is None:
        fused = nucleus.available(logits)
    if fused:
        return nucleus.nucleus_sample(logits, uniforms, sampling.temperature, sampling.top_p)
    scaled = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        scaled = scaled.masked_fill(scaled < nucleus_floor(scaled, sampling.top_p), float("-inf"))
    cumulative = scaled.softmax(dim=-1).cumsum(dim=-1, dtype=torch.float64)
    index = torch.searchsorted(cumulative, uniforms.to(torch.float64).view(batch, 1) * cumulative[:, -1:])
    last = torch.where(scaled > float("-inf"), torch.arange(vocab, device=logits.device), -1).amax(-1, keepdim=True)
    return torch.minimum(index, last).view(batch)  # rounding: never past the last kept token


def nucleus_floor(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[B, 1]``: the smallest logit whose strictly-more-likely mass is ``< top_p`` (one sort)."""
    ordered = torch.sort(scaled, dim=-1, descending=True).values
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1, dtype=torch.float64) - probs  # mass strictly before each position
    kept = (before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    return ordered.gather(-1, kept - 1)
