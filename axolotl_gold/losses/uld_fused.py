"""ULD from hidden states and lm_head weights, in chunks of aligned positions.

The trainer's entry point, ``uld_loss_sum``: the formulas are those of
``axolotl_gold.losses.uld``; this module only decides which rows each chunk reads, computes
their logits (student with its gradient taken at once, teacher without), and never holds the
full ``[tokens, vocab]`` logits of either model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from axolotl_gold.losses.chunked import head_in_dtype
from axolotl_gold.losses.uld import (
    GroupIndex,
    ULDConfig,
    VocabMapping,
    build_group_index,
    _unmatched_ids,
    _distill_terms,
    _weighted,
    _upcast,
    LOG_MIN_PROB,
    queued_copy,
)

# Chunked path. A chunk's rows are laid out as [its positions' base rows, then its extra rows]
# (every token is in exactly one group, so there are no duplicates): the merged distributions
# are then a slice of the logits, and extra rows only need a logsumexp, not a log-softmax.


_CHUNK_LOGITS = 2**23


@dataclass(frozen=True)
class _ChunkSide:
    rows: torch.Tensor  # [P_c + E_c] flat rows to read: base rows, then extra rows
    base_id: torch.Tensor  # [P_c]
    extra_pos: torch.Tensor  # [E_c] chunk-local positions
    extra_id: torch.Tensor  # [E_c]


def _auto_chunk_size(vocab: int) -> int:
    # About _CHUNK_LOGITS logits per side and chunk, a power of two >= 16 positions.
    return max(16, 2 ** int(math.log2(max(1, _CHUNK_LOGITS // vocab))))


def _chunk_side(index: GroupIndex, on_device: GroupIndex, p0: int, p1: int) -> _ChunkSide:
    """The rows positions ``p0:p1`` read: their bounds found in the host's ``index``, the
    tensors sliced from its copy ``on_device`` (copied once per call, not per chunk)."""
    p1 = min(p1, index.num_positions)
    e0, e1 = torch.searchsorted(index.extra_pos, torch.tensor([p0, p1])).tolist()
    return _ChunkSide(
        rows=torch.cat([on_device.base_row[p0:p1], on_device.extra_row[e0:e1]]),
        base_id=on_device.base_id[p0:p1],
        extra_pos=on_device.extra_pos[e0:e1] - p0,
        extra_id=on_device.extra_id[e0:e1],
    )


def _merge_chunk(logits: torch.Tensor, side: _ChunkSide, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged log-distributions ``[P_c, V]`` of a chunk, and the logsumexp of its rows at T."""
    num_base = side.base_id.numel()
    scaled = logits if temperature == 1.0 else logits / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    shift = lse[:num_base]
    if side.extra_pos.numel():
        extra = torch.arange(num_base, scaled.size(0), device=scaled.device)
        observed = (scaled[extra, side.extra_id] - lse[num_base:]).clamp_min(LOG_MIN_PROB)
        shift = shift - shift.new_zeros(num_base).index_add(0, side.extra_pos, observed)
    return scaled[:num_base] - shift.unsqueeze(-1), lse


def _chunk_loss(s_logits, t_logits, s_side, t_side, config, mapping, unmatched):
    s_merged, s_lse = _merge_chunk(s_logits, s_side, config.student_temperature)
    t_merged, _ = _merge_chunk(t_logits, t_side, config.teacher_temperature)
    parts = _distill_terms(s_merged, t_merged, config, mapping, unmatched)
    if config.crossentropy_weight > 0:
        lse1 = s_lse if config.student_temperature == 1.0 else torch.logsumexp(s_logits, dim=-1)
        ids = torch.cat([s_side.base_id, s_side.extra_id])
        picked = s_logits.gather(1, ids.unsqueeze(-1)).squeeze(-1)
        parts["ce_sum"] = (lse1 - picked).sum()
    return _weighted(parts, config)


class _ChunkedULD(torch.autograd.Function):
    """Loss and student gradients computed chunk by chunk in the forward pass (as Liger's fused
    linear losses do): only one chunk's logits of each model exist at a time, and backward
    only scales the stored gradients."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, chunks, config, mapping, unmatched, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # a float32 master head under bf16 autocast computes from a bf16 copy and gets its
        # float32 accumulator back (as the chunked JSD: ``chunked.head_in_dtype``)
        master_dtype = s_weight.dtype
        s_weight = head_in_dtype(s_weight, compute_dtype)
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        acc_dtype = torch.promote_types(s_weight.dtype, torch.float32)
        grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=s_weight.device) if need_w else None
        total = torch.zeros((), dtype=acc_dtype, device=s_hidden.device)
        for s_side, t_side in chunks:
            # hidden states may come in another dtype than the head (a float32 final norm
            # before a bfloat16 head): the product is in the head's dtype, as the model's own
            # head computes it (the same rule as the chunked JSD)
            h = s_hidden.index_select(0, s_side.rows).to(s_weight.dtype)
            t_logits = _upcast(t_hidden.index_select(0, t_side.rows).to(t_weight.dtype) @ t_weight.T)
            s_logits = _upcast(h @ s_weight.T).requires_grad_(need_h or need_w)
            with torch.enable_grad():
                loss = _chunk_loss(s_logits, t_logits, s_side, t_side, config, mapping, unmatched)
                if need_h or need_w:
                    (g_logits,) = torch.autograd.grad(loss, s_logits)
            total += loss.detach()
            if need_h or need_w:
                g_logits = g_logits.to(s_weight.dtype)
                if need_h:
                    grad_h.index_add_(0, s_side.rows, (g_logits @ s_weight).to(grad_h.dtype))
                if need_w and grad_w.dtype == s_weight.dtype:
                    grad_w.addmm_(g_logits.T, h)
                elif need_w:
                    grad_w.add_(g_logits.T @ h)
        if need_w:
            grad_w = grad_w.to(master_dtype)  # a bf16 master: drop the float32 accumulator before backward
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # Scaled into new tensors (the stored ones stay for a retained graph's next backward).
        # The trainer's upstream gradient is 1 / the window's count, never 1: skipping the copy
        # when it is 1 would read it on the host, a wait for the device each micro-step.
        grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        grad_w = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def _flatten_rows(hidden, name: str) -> tuple[torch.Tensor, list[int], list[int]]:
    """``[N, H]`` rows, each sequence's first flat row, and each sequence's row count."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        batch, length, _ = hidden.shape
        return hidden.reshape(batch * length, -1), [r * length for r in range(batch)], [length] * batch
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
        return hidden, [0], [hidden.size(0)]
    if isinstance(hidden, (list, tuple)) and all(isinstance(h, torch.Tensor) and h.dim() == 2 for h in hidden):
        lengths = [h.size(0) for h in hidden]
        offsets = [sum(lengths[:r]) for r in range(len(lengths))]
        return torch.cat(list(hidden), dim=0), offsets, lengths
    raise TypeError(f"{name} must be a [L, H] or [B, L, H] tensor, or a list of [L_r, H] tensors.")


def _as_rows(ids, batch: int) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    rows = list(ids)
    if batch == 1 and (not rows or isinstance(rows[0], int)):
        rows = [rows]
    return [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]


def _as_group_rows(groups, batch: int) -> list:
    groups = list(groups)
    if batch == 1 and (not groups or (groups[0] and isinstance(groups[0][0], int))):
        return [groups]
    return groups


def uld_loss_sum(
    student_hidden: torch.Tensor | Sequence[torch.Tensor],
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | Sequence[torch.Tensor],
    teacher_weight: torch.Tensor,
    student_ids,
    teacher_ids,
    student_groups,
    teacher_groups,
    config: ULDConfig = ULDConfig(),
    mapping: VocabMapping | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """ULD (or hybrid ULD) loss SUM from last hidden states and lm_head weights, chunked.

    Student logits are computed per chunk of aligned positions, only for the rows that chunk
    reads, and their gradient is taken at once; teacher logits per chunk without gradient. The
    full ``[tokens, vocab]`` logits of either model are never held.

    Args:
        student_hidden: per sequence, rows aligned with its completion tokens (see the module
            docstring): one ``[L, Hs]`` tensor, a padded ``[B, L, Hs]`` tensor (rows past a
            sequence's length are never read), or a list of ``[L_r, Hs]`` tensors.
        student_weight: lm_head weight ``[Vs, Hs]`` (no bias). Receives a gradient if it
            requires one (accumulated over chunks in float32, returned in its dtype).
        teacher_hidden, teacher_weight: the same for the teacher (``[.., Ht]``, ``[Vt, Ht]``);
            treated as constants.
        student_ids, teacher_ids: per sequence, its completion token ids (lists or a
            ``[B, L]`` tensor; a single list for one sequence).
        student_groups, teacher_groups: per sequence, the aligned groups from
            ``axolotl_gold.crosstok.alignment.align_completion`` (no empty groups).
        config: temperatures, merge, weights, hybrid settings, chunk size.
        mapping: a ``VocabMapping`` switches on hybrid ULD.
        compute_dtype: the dtype the student head's matmul runs in (a float32 head under bf16
            autocast: bf16); None: the weight's own. Its gradient comes back in its own dtype.

    Returns:
        ``(loss_sum, num_positions)``: ``sum_p distillation_weight * D_p + crossentropy_weight *
        NLL_p`` (a float32 scalar, float64 for float64 inputs, with gradient) and the number of
        aligned positions. The trainer divides by the position count of the whole optimizer
        window.
    """
    s_flat, s_offsets, s_lengths = _flatten_rows(student_hidden, "student_hidden")
    t_flat, t_offsets, t_lengths = _flatten_rows(teacher_hidden, "teacher_hidden")
    batch = len(s_offsets)
    if len(t_offsets) != batch:
        raise ValueError(f"{batch} student sequences but {len(t_offsets)} teacher sequences.")
    s_groups, t_groups = _as_group_rows(student_groups, batch), _as_group_rows(teacher_groups, batch)
    for r in range(batch):
        if len(s_groups[r]) != len(t_groups[r]):
            raise ValueError(f"Sequence {r}: {len(s_groups[r])} student groups but {len(t_groups[r])} teacher groups.")
        _check_groups(s_groups[r], s_lengths[r], "student", r)
        _check_groups(t_groups[r], t_lengths[r], "teacher", r)
    s_index = build_group_index(s_groups, _as_rows(student_ids, batch), s_offsets, config.merge)
    t_index = build_group_index(t_groups, _as_rows(teacher_ids, batch), t_offsets, config.merge)

    chunk_size = config.chunk_size or _auto_chunk_size(max(student_weight.size(0), teacher_weight.size(0)))
    device = s_flat.device
    s_on, t_on = s_index.to(device), t_index.to(device)  # the host's indexes, queued behind the forwards
    chunks = [
        (_chunk_side(s_index, s_on, p0, p0 + chunk_size), _chunk_side(t_index, t_on, p0, p0 + chunk_size))
        for p0 in range(0, s_index.num_positions, chunk_size)
    ]
    unmatched = None
    if mapping is not None:
        # found where the mapping is (the host's: its max and nonzero read no device), then copied
        unmatched = (
            queued_copy(_unmatched_ids(mapping.student_ids, student_weight.size(0)), device),
            queued_copy(_unmatched_ids(mapping.teacher_ids, teacher_weight.size(0)), device),
        )
        mapping = mapping.to(device)
    loss = _ChunkedULD.apply(
        s_flat, student_weight, t_flat.detach(), teacher_weight.detach(), chunks, config, mapping, unmatched,
        compute_dtype,
    )
    return loss, s_index.num_positions


def _check_groups(groups, length: int, side: str, row: int) -> None:
    for group in groups:
        if not group:
            raise ValueError(f"Sequence {row}: empty {side} group; align with align_completion, which drops them.")
        if group[-1] >= length or group[0] < 0:
            raise ValueError(f"Sequence {row}: {side} group {group} is outside its {length} rows.")
