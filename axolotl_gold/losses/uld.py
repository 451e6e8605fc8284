"""Universal Logit Distillation (ULD) and hybrid ULD across two tokenizers.

Pipeline for one batch, each stage a function of this module:

1. ``build_group_index``: per-side index tensors from the aligned groups
   (``axolotl_gold.alignment``), built once per batch.
2. ``merge_logprobs``: one (unnormalized) distribution per aligned position and side, by the
   chain rule over the group's tokens, vectorized over positions.
3. ``sorted_l1_rows`` / ``hybrid_uld_rows``: sorted-L1 ULD, or hybrid ULD (generalized JSD on tokens whose
   strings both vocabularies share, sorted L1 on the rest), one value per position.
4. ``uld_loss_sum``: the trainer's entry point. From both models' last hidden states and
   lm_head weights, in chunks of aligned positions; returns a SUM and the position count, so
   the trainer normalizes once over the whole optimizer window.

Row convention: the rows passed for a sequence are aligned with its completion tokens, row k
for token k. With ``merge="bayesian"`` (default) row k must be the state that *predicts*
token k (sequence position ``start + k - 1``); ``completion_rows`` slices it. ``"observed"``
reproduces the reference's default, which pairs token k with the state at its own position
(predicting token k + 1): the first completion token is never scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "GroupIndex",
    "ULDConfig",
    "VocabMapping",
    "build_group_index",
    "build_vocab_mapping",
    "completion_rows",
    "generalized_jsd_rows",
    "hybrid_uld_rows",
    "merge_groups",
    "merge_logprobs",
    "sorted_l1_rows",
    "uld_loss_from_logits",
    "uld_loss_sum",
]

# The reference clamps merged token probabilities and JSD inputs at 1e-8; kept for parity.
MIN_PROB = 1e-8
LOG_MIN_PROB = math.log(MIN_PROB)

Merge = Literal["bayesian", "observed"]


@dataclass(frozen=True)
class ULDConfig:
    """ULD loss settings.

    Attributes:
        student_temperature, teacher_temperature: softmax temperatures of each side (> 0).
        merge: ``"bayesian"``: a group ``[i..j]`` merges to the distribution of row j (token j
            given the observed tokens i..j-1) times the probabilities of the observed tokens
            i..j-1, i.e. the joint probability of the group's prefix and each possible last
            token (the reference's ``"bayesian"``). ``"observed"``: row i times the
            probabilities of tokens i+1..j taken from their own rows (the reference's default,
            fed with the unshifted rows; see the module docstring).
        distillation_weight: weight of the ULD / hybrid term.
        crossentropy_weight: weight of the student's own negative log-likelihood of each
            aligned group's tokens (temperature 1). Needs ``merge="bayesian"`` rows.
        hybrid_matched_weight, hybrid_unmatched_weight: fixed hybrid weights; both ``None``
            for adaptive weights (matched fraction of the teacher's logit dimension, and its
            complement). Used only when a ``VocabMapping`` is given.
        hybrid_beta: generalized-JSD interpolation for matched tokens (0: KL(T||S), 1: KL(S||T)).
        chunk_size: aligned positions per chunk in ``uld_loss_sum``; ``None`` picks a power of
            two with about 2**23 logits per side and chunk (32 at a 152k vocabulary). The chunk's
            temporaries (logits, merged distributions, both sorts, their gradients) peak at
            about 25 x chunk_size x vocab x 4 bytes on CUDA: smaller chunks trade speed for memory.
    """

    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    merge: Merge = "bayesian"
    distillation_weight: float = 1.0
    crossentropy_weight: float = 0.0
    hybrid_matched_weight: float | None = None
    hybrid_unmatched_weight: float | None = None
    hybrid_beta: float = 0.5
    chunk_size: int | None = None

    def __post_init__(self):
        if self.student_temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("ULD temperatures must be positive.")
        if self.merge not in ("bayesian", "observed"):
            raise ValueError(f'`merge` must be "bayesian" or "observed", got {self.merge!r}.')
        if self.distillation_weight < 0 or self.crossentropy_weight < 0:
            raise ValueError("ULD loss weights must be non-negative.")
        if self.crossentropy_weight > 0 and self.merge == "observed":
            raise ValueError(
                'The cross-entropy term needs rows that predict their tokens: use merge="bayesian" '
                "or set crossentropy_weight to 0."
            )
        if (self.hybrid_matched_weight is None) != (self.hybrid_unmatched_weight is None):
            raise ValueError(
                "Set both hybrid_matched_weight and hybrid_unmatched_weight (fixed weights) or neither (adaptive)."
            )
        if not 0.0 <= self.hybrid_beta <= 1.0:
            raise ValueError("hybrid_beta must be in [0, 1].")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be a positive number of aligned positions.")


# --------------------------------------------------------------------------------------------
# Vocabulary mapping (hybrid ULD)


@dataclass(frozen=True)
class VocabMapping:
    """Token strings present in both vocabularies: ``student_ids[m]`` and ``teacher_ids[m]``
    spell the same string. Sorted by teacher id. Long tensors of shape ``[M]``."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def to(self, device) -> VocabMapping:
        return VocabMapping(self.student_ids.to(device), self.teacher_ids.to(device))

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())


def build_vocab_mapping(student_tokenizer, teacher_tokenizer) -> VocabMapping:
    """Match tokens whose vocabulary strings (``get_vocab()``, added tokens included) are equal."""
    student_vocab = student_tokenizer.get_vocab()
    pairs = sorted(
        (teacher_id, student_vocab[token])
        for token, teacher_id in teacher_tokenizer.get_vocab().items()
        if token in student_vocab
    )
    teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
    return VocabMapping(student_ids=student_ids, teacher_ids=teacher_ids)


# --------------------------------------------------------------------------------------------
# Group index and merging


@dataclass(frozen=True)
class GroupIndex:
    """Where one side's aligned positions read their rows. Long tensors.

    Attributes:
        base_row, base_id: ``[P]`` flat row whose full distribution a position keeps, and the
            token observed there.
        extra_pos, extra_row, extra_id: ``[E]`` for every other token of a group: its aligned
            position, flat row and token id; only its observed-token probability is used.
            Sorted by position.
    """

    base_row: torch.Tensor
    base_id: torch.Tensor
    extra_pos: torch.Tensor
    extra_row: torch.Tensor
    extra_id: torch.Tensor

    @property
    def num_positions(self) -> int:
        return int(self.base_row.numel())

    def to(self, device) -> GroupIndex:
        return GroupIndex(*(t.to(device) for t in self._tensors()))

    def _tensors(self):
        return self.base_row, self.base_id, self.extra_pos, self.extra_row, self.extra_id


def build_group_index(
    groups: Sequence[Sequence[Sequence[int]]],
    token_ids: Sequence[Sequence[int]],
    row_offsets: Sequence[int],
    merge: Merge = "bayesian",
) -> GroupIndex:
    """Index tensors for one side of a batch (a Python loop over groups, no tensor math).

    Args:
        groups: per sequence, its aligned groups (token indices into that sequence); empty
            groups are not allowed (``align_completion`` drops them).
        token_ids: per sequence, its completion token ids.
        row_offsets: per sequence, the flat row of its token 0 (``r * L`` for a padded
            ``[B, L, ...]`` tensor viewed as ``[B * L, ...]``).
        merge: which token of a group keeps its full distribution: the last
            (``"bayesian"``) or the first (``"observed"``).
    """
    base_row, base_id, extra_pos, extra_row, extra_id = [], [], [], [], []
    for row_groups, ids, offset in zip(groups, token_ids, row_offsets, strict=True):
        for group in row_groups:
            if not group:
                raise ValueError("Empty alignment group: drop one-sided pairs first (align_completion does).")
            base = group[-1] if merge == "bayesian" else group[0]
            position = len(base_row)
            base_row.append(offset + base)
            base_id.append(int(ids[base]))
            for k in group:
                if k != base:
                    extra_pos.append(position)
                    extra_row.append(offset + k)
                    extra_id.append(int(ids[k]))

    def as_long(values):
        return torch.tensor(values, dtype=torch.long)

    return GroupIndex(*(as_long(v) for v in (base_row, base_id, extra_pos, extra_row, extra_id)))


def merge_logprobs(logprobs: torch.Tensor, index: GroupIndex) -> torch.Tensor:
    """One log-distribution per aligned position: ``[N, V]`` rows -> ``[P, V]``.

    ``merged[p] = logprobs[base_row[p]] + sum over the group's other tokens of
    max(logprobs[row, id], log 1e-8)``: the reference's product of probabilities, in log
    space. The result is unnormalized (it sums to the probability of the fixed tokens).
    """
    merged = logprobs.index_select(0, index.base_row)
    if index.extra_pos.numel():
        observed = logprobs[index.extra_row, index.extra_id].clamp_min(LOG_MIN_PROB)
        bonus = observed.new_zeros(merged.size(0)).index_add(0, index.extra_pos, observed)
        merged = merged + bonus.unsqueeze(-1)
    return merged


def merge_groups(
    logprobs: torch.Tensor, token_ids: Sequence[int], groups: Sequence[Sequence[int]], merge: Merge = "bayesian"
) -> torch.Tensor:
    """``merge_logprobs`` for one sequence: ``[L, V]`` log-probs, row k aligned with token k -> ``[P, V]``."""
    index = build_group_index([groups], [token_ids], [0], merge).to(logprobs.device)
    return merge_logprobs(logprobs, index)


def completion_rows(states: torch.Tensor, start: int, length: int, merge: Merge = "bayesian") -> torch.Tensor:
    """Slice one sequence's per-position states ``[S, ...]`` to the rows paired with its
    completion tokens ``start .. start + length - 1``.

    ``"bayesian"``: positions ``start - 1 ..`` (each row predicts its token; needs a prompt).
    ``"observed"``: positions ``start ..`` (the reference's shifted pairing).
    """
    if merge == "bayesian":
        if start < 1:
            raise ValueError("No state predicts the first completion token when the completion starts at position 0.")
        return states[start - 1 : start - 1 + length]
    return states[start : start + length]


# --------------------------------------------------------------------------------------------
# Per-position losses


def sorted_l1_rows(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """L1 distance between each row sorted in descending order, zero-padded to the larger
    width: ``[P, Vs], [P, Vt] -> [P]``.

    A full sort is needed: the tail beyond any top-k is not determined by its sum (pairing of
    order statistics), so no cheaper exact method is used. The zero padding is not built: the
    wider side's sorted tail is summed. The backward keeps only the sort permutation and the
    signs (int8), not the sorted copies and their differences.
    """
    return _SortedL1.apply(p_student, p_teacher)


class _SortedL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_student, p_teacher):
        a, a_perm = p_student.sort(dim=-1, descending=True)
        b, b_perm = p_teacher.sort(dim=-1, descending=True)
        width = min(a.size(-1), b.size(-1))
        diff = a[:, :width] - b[:, :width]
        loss = diff.abs().sum(-1) + a[:, width:].sum(-1) + b[:, width:].sum(-1)
        need_s, need_t = ctx.needs_input_grad[:2]
        ctx.save_for_backward(diff.sign().to(torch.int8), a_perm if need_s else None, b_perm if need_t else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        sign, a_perm, b_perm = ctx.saved_tensors
        grads = []
        for perm, direction in ((a_perm, 1), (b_perm, -1)):
            if perm is None:
                grads.append(None)
                continue
            # d|a_k - b_k| / d a_k = sign; the tail past the common width is a plain sum.
            sorted_grad = torch.ones(perm.shape, dtype=grad_out.dtype, device=perm.device)
            sorted_grad[:, : sign.size(-1)] = sign * direction
            sorted_grad *= grad_out.unsqueeze(-1)
            grads.append(torch.empty_like(sorted_grad).scatter_(1, perm, sorted_grad))
        return grads[0], grads[1]


def generalized_jsd_rows(s_log: torch.Tensor, t_log: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD per row from log-probabilities ``[P, M]`` -> ``[P]``.

    ``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with ``M = (1 - beta) S + beta T``;
    ``beta = 0`` is ``KL(T || S)`` and ``beta = 1`` is ``KL(S || T)``. Inputs need not be
    normalized (the hybrid loss applies it to a vocabulary subset, as the reference does).
    """
    if beta == 0:
        return (t_log.exp() * (t_log - s_log)).sum(-1)
    if beta == 1:
        return (s_log.exp() * (s_log - t_log)).sum(-1)
    mix = torch.logaddexp(s_log + math.log1p(-beta), t_log + math.log(beta))
    kl_t = (t_log.exp() * (t_log - mix)).sum(-1)
    kl_s = (s_log.exp() * (s_log - mix)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _unmatched_ids(matched: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if matched.numel() and int(matched.max()) >= vocab_size:
        raise ValueError(f"Vocabulary mapping has ids beyond the logit dimension {vocab_size}.")
    keep = torch.ones(vocab_size, dtype=torch.bool, device=matched.device)
    keep[matched] = False
    return keep.nonzero().squeeze(-1)


def hybrid_uld_rows(
    s_log: torch.Tensor,
    t_log: torch.Tensor,
    mapping: VocabMapping,
    config: ULDConfig,
    unmatched: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hybrid ULD per position, from merged log-distributions ``[P, Vs]``, ``[P, Vt]``.

    Matched tokens: generalized JSD (``config.hybrid_beta``) on the matched columns, each side
    clamped at 1e-8 and not renormalized. The rest: sorted L1 on the unmatched columns (0 when
    either side has none). Weights: fixed, or ``M / Vt`` and ``1 - M / Vt``, as the reference.

    Returns:
        ``(total, matched, unmatched)``, each ``[P]``; ``total`` is the weighted sum.
    """
    s_unmatched, t_unmatched = unmatched or (
        _unmatched_ids(mapping.student_ids, s_log.size(-1)),
        _unmatched_ids(mapping.teacher_ids, t_log.size(-1)),
    )
    num_matched = len(mapping)
    if num_matched:
        matched = generalized_jsd_rows(
            s_log[:, mapping.student_ids].clamp_min(LOG_MIN_PROB),
            t_log[:, mapping.teacher_ids].clamp_min(LOG_MIN_PROB),
            config.hybrid_beta,
        )
    else:
        matched = s_log.new_zeros(s_log.size(0))
    if s_unmatched.numel() and t_unmatched.numel():
        rest = sorted_l1_rows(s_log[:, s_unmatched].exp(), t_log[:, t_unmatched].exp())
    else:
        rest = s_log.new_zeros(s_log.size(0))
    if config.hybrid_matched_weight is None:
        w_matched = num_matched / max(1, t_log.size(-1))
        w_rest = 1.0 - w_matched
    else:
        w_matched, w_rest = config.hybrid_matched_weight, config.hybrid_unmatched_weight
    return w_matched * matched + w_rest * rest, matched, rest


# --------------------------------------------------------------------------------------------
# From logits (plain) and from hidden states (chunked)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Softmax, sort and sums in at least float32 (bf16 logits lose the small probabilities).
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _distill_terms(
    s_merged: torch.Tensor,
    t_merged: torch.Tensor,
    config: ULDConfig,
    mapping: VocabMapping | None,
    unmatched: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Summed (unweighted) distillation parts from merged log-distributions."""
    if mapping is None:
        return {"uld_sum": sorted_l1_rows(s_merged.exp(), t_merged.exp()).sum()}
    total, matched, rest = hybrid_uld_rows(s_merged, t_merged, mapping, config, unmatched)
    return {"uld_sum": total.sum(), "matched_sum": matched.sum(), "unmatched_sum": rest.sum()}


def _weighted(parts: dict[str, torch.Tensor], config: ULDConfig) -> torch.Tensor:
    loss = config.distillation_weight * parts["uld_sum"]
    if "ce_sum" in parts:
        loss = loss + config.crossentropy_weight * parts["ce_sum"]
    return loss


def uld_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_index: GroupIndex,
    teacher_index: GroupIndex,
    config: ULDConfig = ULDConfig(),
    mapping: VocabMapping | None = None,
) -> tuple[torch.Tensor, int]:
    """Plain (unchunked) ULD loss from full flat logits ``[Ns, Vs]`` and ``[Nt, Vt]``.

    The straightforward composition (log-softmax of every row, ``merge_logprobs``, loss);
    ``uld_loss_sum`` gives the same value without holding full logits.

    Returns:
        ``(loss_sum, num_positions)``: ``sum_p distillation_weight * D_p +
        crossentropy_weight * NLL_p`` over the aligned positions.
    """
    student_logits, teacher_logits = _upcast(student_logits), _upcast(teacher_logits)
    s_logp = torch.log_softmax(student_logits / config.student_temperature, dim=-1)
    t_logp = torch.log_softmax(teacher_logits / config.teacher_temperature, dim=-1)
    s_merged, t_merged = merge_logprobs(s_logp, student_index), merge_logprobs(t_logp, teacher_index)
    parts = _distill_terms(s_merged, t_merged, config, mapping)
    if config.crossentropy_weight > 0:
        logp1 = torch.log_softmax(student_logits, dim=-1)
        idx = student_index
        parts["ce_sum"] = -logp1[idx.base_row, idx.base_id].sum() - logp1[idx.extra_row, idx.extra_id].sum()
    return _weighted(parts, config), student_index.num_positions


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


def _chunk_side(index: GroupIndex, p0: int, p1: int, device) -> _ChunkSide:
    p1 = min(p1, index.num_positions)
    e0, e1 = torch.searchsorted(index.extra_pos, torch.tensor([p0, p1])).tolist()
    return _ChunkSide(
        rows=torch.cat([index.base_row[p0:p1], index.extra_row[e0:e1]]).to(device),
        base_id=index.base_id[p0:p1].to(device),
        extra_pos=(index.extra_pos[e0:e1] - p0).to(device),
        extra_id=index.extra_id[e0:e1].to(device),
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
    return _weighted(parts, config), parts


class _ChunkedULD(torch.autograd.Function):
    """Loss and student gradients computed chunk by chunk in the forward pass (as Liger's fused
    linear losses do): only one chunk's logits of each model exist at a time, and backward
    only scales the stored gradients."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, chunks, config, mapping, unmatched, stats):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        acc_dtype = torch.promote_types(s_weight.dtype, torch.float32)
        grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=s_weight.device) if need_w else None
        total = torch.zeros((), dtype=acc_dtype, device=s_hidden.device)
        for s_side, t_side in chunks:
            h = s_hidden.index_select(0, s_side.rows)
            t_logits = _upcast(t_hidden.index_select(0, t_side.rows) @ t_weight.T)
            s_logits = _upcast(h @ s_weight.T).requires_grad_(need_h or need_w)
            with torch.enable_grad():
                loss, parts = _chunk_loss(s_logits, t_logits, s_side, t_side, config, mapping, unmatched)
                if need_h or need_w:
                    (g_logits,) = torch.autograd.grad(loss, s_logits)
            total += loss.detach()
            if stats is not None:
                for key, value in parts.items():
                    stats[key] = stats.get(key, 0.0) + value.detach()
            if need_h or need_w:
                g_logits = g_logits.to(s_weight.dtype)
                if need_h:
                    grad_h.index_add_(0, s_side.rows, g_logits @ s_weight)
                if need_w and grad_w.dtype == s_weight.dtype:
                    grad_w.addmm_(g_logits.T, h)
                elif need_w:
                    grad_w.add_(g_logits.T @ h)
        if need_w:
            grad_w = grad_w.to(s_weight.dtype)  # drop the float32 accumulator before backward
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # The usual upstream gradient is exactly 1: then hand the stored gradients over without
        # another lm_head-sized copy (the check costs one device sync).
        if not bool(grad_out == 1):
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
    stats: dict[str, torch.Tensor] | None = None,
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
            ``axolotl_gold.alignment.align_completion`` (no empty groups).
        config: temperatures, merge, weights, hybrid settings, chunk size.
        mapping: a ``VocabMapping`` switches on hybrid ULD.
        stats: if given, receives detached sums ``uld_sum`` (and ``matched_sum``,
            ``unmatched_sum`` for hybrid, ``ce_sum`` with cross-entropy), for logging.

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
    chunks = [
        (_chunk_side(s_index, p0, p0 + chunk_size, device), _chunk_side(t_index, p0, p0 + chunk_size, device))
        for p0 in range(0, s_index.num_positions, chunk_size)
    ]
    unmatched = None
    if mapping is not None:
        mapping = mapping.to(s_flat.device)
        unmatched = (
            _unmatched_ids(mapping.student_ids, student_weight.size(0)),
            _unmatched_ids(mapping.teacher_ids, teacher_weight.size(0)),
        )
    loss = _ChunkedULD.apply(
        s_flat, student_weight, t_flat.detach(), teacher_weight.detach(), chunks, config, mapping, unmatched, stats
    )
    return loss, s_index.num_positions


def _check_groups(groups, length: int, side: str, row: int) -> None:
    for group in groups:
        if not group:
            raise ValueError(f"Sequence {row}: empty {side} group; align with align_completion, which drops them.")
        if group[-1] >= length or group[0] < 0:
            raise ValueError(f"Sequence {row}: {side} group {group} is outside its {length} rows.")
