"""Universal Logit Distillation (ULD) and hybrid ULD across two tokenizers.

Pipeline for one batch, each stage a function of this module:

1. ``build_group_index``: per-side index tensors from the aligned groups
   (``axolotl_gold.crosstok.alignment``), built once per batch.
2. ``merge_logprobs``: one (unnormalized) distribution per aligned position and side, by the
   chain rule over the group's tokens, vectorized over positions.
3. ``sorted_l1_rows`` / ``hybrid_uld_rows``: sorted-L1 ULD, or hybrid ULD (generalized JSD on tokens whose
   strings both vocabularies share, sorted L1 on the rest), one value per position.
4. ``axolotl_gold.losses.uld_fused.uld_loss_sum``: the trainer's entry point. From both models' last hidden states and
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


def queued_copy(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor goes to CUDA through page-locked memory with
    ``non_blocking``: a blocking copy from pageable memory would wait for everything the device
    has queued (the models' forwards), once per tensor."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------------
# Vocabulary mapping (hybrid ULD)


@dataclass(frozen=True)
class VocabMapping:
    """Token strings present in both vocabularies: ``student_ids[m]`` and ``teacher_ids[m]``
    spell the same string. Sorted by teacher id. Long tensors of shape ``[M]``."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def to(self, device) -> VocabMapping:
        return VocabMapping(queued_copy(self.student_ids, device), queued_copy(self.teacher_ids, device))

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
        return GroupIndex(*(queued_copy(t, device) for t in self._tensors()))

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
