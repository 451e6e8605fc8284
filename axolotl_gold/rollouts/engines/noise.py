"""Sampling noise that belongs to a row, not to a batch.

The static engine samples each token by inverting its distribution's CDF at one uniform
``u`` per row (``sampling.sample_tokens``). Drawing ``u`` from one generator ties a row's
sample to everything else in its batch: how many rows share it, in what order, how the
window was split by a memory bound, which rows already stopped. Here ``u`` is a pure
function of ``(window seed, row index, token step)``: a counter-based hash (splitmix64's
finalizer, in wrapping int64 arithmetic), so a row gets the same sample whatever the
batching, and on any device.
"""

from __future__ import annotations

import torch

_GAMMA = -7046029254386353131  # 0x9E3779B97F4A7C15, the golden-ratio increment, as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` sign-extends)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection of int64 whose outputs look independent."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def row_seeds(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 seeds of rows (their indices in the engine call) of a call seeded ``seed``."""
    base = mix64(torch.tensor(seed & 0x7FFFFFFFFFFFFFFF, dtype=torch.long))
    return mix64(base.to(rows.device) + rows.long() * _GAMMA)


def row_uniforms(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 draws of U(0, 1), never 0 or 1, for token step ``step`` of rows ``seeds``."""
    step = torch.as_tensor(step, dtype=torch.long, device=seeds.device)
    bits = mix64(seeds + (step + 1) * _GAMMA)
    return (_shr(bits, 11).double() + 0.5) * 2.0**-53  # 53 random bits
