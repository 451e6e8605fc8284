"""Rows to tensors: the collator and the scoring batch of one micro-step.

A scoring batch puts each row's prompt left-padded to the widest prompt ``P`` and
its completion right-padded to the longest completion ``C``::

    [pad pad p0 p1 p2 | c0 c1 c2 pad]

so the completion region is the same column range for every row, and the hidden
state at column ``P - 1 + k`` predicts completion token ``k``. Masks come from each
row's own lengths, never from the padded width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch


@dataclass
class Rollout:
    """One row of a window: token ids plus the text a foreign tokenizer needs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt_messages: list[dict] = field(default_factory=list)
    completion_text: str = ""
    images: list = field(default_factory=list)  # decoded PIL images (vision rows)
    prompt_text: str = ""  # the rendered prompt, for the processor (vision rows)
    teacher: str | None = None  # the teacher server that scores it (`teacher_servers`' name)


class GoldCollator:
    """Keeps rows as Python lists: completions are replaced once rollouts exist."""

    def __call__(self, rows: list[dict]) -> dict:
        rollouts = []
        for row in rows:
            n = int(row["gold_prompt_length"])
            ids = list(row["input_ids"])
            messages = row.get("gold_prompt_messages")
            rollouts.append(
                Rollout(
                    prompt_ids=ids[:n],
                    completion_ids=ids[n:],
                    prompt_messages=json.loads(messages) if messages else [],
                    completion_text=row.get("gold_completion_text") or "",
                    teacher=row.get("gold_teacher"),
                )
            )
        return {"gold_rollouts": rollouts}


def merge_repeats(rows: list[Rollout]) -> tuple[list[Rollout], list[int]]:
    """Consecutive identical rows as one row and its count.

    An off-policy slice holds each prompt ``num_generations`` times with the same
    dataset completion: scoring it once with weight ``count`` gives the same loss sum
    and gradient for a fraction of the forward passes. Rows differing in anything
    (ids, messages, text, images) stay apart.
    """
    merged: list[Rollout] = []
    counts: list[int] = []
    for row in rows:
        if merged and row == merged[-1]:
            counts[-1] += 1
        else:
            merged.append(row)
            counts.append(1)
    return merged, counts


Group = tuple[list[Rollout], list[int]]  # a micro-batch's rows and each row's count (``merge_repeats``)


def padded_positions(groups: list[Group]) -> tuple[int, int]:
    """(all micro-batches', the largest one's) positions as ``build_scoring_batch`` pads
    them: rows x (widest prompt + longest completion), what the forwards compute over."""
    sizes = [len(rows) * (max(len(r.prompt_ids) for r in rows) + max(len(r.completion_ids) for r in rows))
             for rows, _ in groups if rows]
    return sum(sizes, 0), max(sizes, default=0)


def group_by_length(groups: list[Group]) -> list[Group]:
    """The window's rows regrouped so that each micro-batch holds rows of similar length:
    as many micro-batches, each with as many rows as before, the longest rows in the
    smallest micro-batches (rows keep their window order within one), sorted by prompt +
    completion, by completion or by prompt length, whichever pads fewest positions. Kept as
    they were unless that pads fewer positions in all and no more in the largest
    micro-batch, so peak memory never grows.

    The window's loss is a sum over its rows divided by its token count, so the grouping
    changes no loss or gradient (only float rounding); it cuts the padded positions the
    student's forward and backward and the teacher's forward compute (completions of a
    ragged window vary several-fold)."""
    items = [(row, count) for rows, counts in groups for row, count in zip(rows, counts)]
    total, largest = padded_positions(groups)
    best, best_total = groups, total
    # a batch pads to its widest prompt plus its longest completion: rows sorted by either
    # length or by both, whichever pads least
    for length in (lambda r: len(r.prompt_ids) + len(r.completion_ids), lambda r: len(r.completion_ids),
                   lambda r: len(r.prompt_ids)):
        longest_first = sorted(range(len(items)), key=lambda i: -length(items[i][0]))
        regrouped: list = [None] * len(groups)
        taken = 0
        for k in sorted(range(len(groups)), key=lambda k: len(groups[k][0])):  # smallest first
            picked = sorted(longest_first[taken : taken + len(groups[k][0])])
            taken += len(picked)
            regrouped[k] = ([items[i][0] for i in picked], [items[i][1] for i in picked])
        new_total, new_largest = padded_positions(regrouped)
        if new_total < best_total and new_largest <= largest:
            best, best_total = regrouped, new_total
    return best


SCORED_POSITIONS = "scored_positions"


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``[B, C]`` of the scored completion positions (labels != -100), made
    where the batch is built (the host): a boolean index on the device must wait for the device
    to learn how many positions it selects."""
    return (labels != -100).flatten().nonzero().squeeze(1)


def scored_rows(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """``values`` ``[B, C, ...]`` at the batch's scored positions, ``[N, ...]`` in row-major
    order: by its ``scored_positions`` when the batch has them (no wait on the device), else
    by the labels' mask."""
    positions = batch.get(SCORED_POSITIONS)
    if positions is None:
        return values[batch["completion_labels"] != -100]
    return values.flatten(0, 1).index_select(0, positions.to(values.device))


def scored_row_weights(weights: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each scored position's ``row_weights`` entry, ``[N]`` in ``scored_rows``' order."""
    labels = batch["completion_labels"]
    return scored_rows(weights.to(labels.device)[:, None].expand_as(labels), batch)


WEIGHT_GROUPS = "scored_weight_groups"
ROW_COUNTS = "row_counts"  # ``row_weights`` as a host list (split by rows like any per-row list)


def weigh_rows(batch: dict, counts: list[int]) -> None:
    """Row ``i`` of ``batch`` counts ``counts[i]`` times (merged repeats): its ``row_weights``,
    and, found here on the host, ``WEIGHT_GROUPS``: for each distinct weight (ascending) the
    indices into the scored rows (``scored_rows``' order) of the tokens with that weight, which
    the objectives select without waiting for the device (``weight_groups``), and ``ROW_COUNTS``,
    the weights as a list (the per-row objectives read them on the host)."""
    batch["row_weights"] = torch.tensor(counts, dtype=torch.long)
    batch[ROW_COUNTS] = [int(c) for c in counts]
    batch[WEIGHT_GROUPS] = _groups(scored_row_weights(batch["row_weights"], batch))


def _groups(token_weights: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(int(w), (token_weights == w).nonzero().squeeze(1)) for w in token_weights.unique().tolist()]


def weight_groups(batch: dict) -> list[tuple[int, torch.Tensor]]:
    """``(weight, indices into the scored rows)`` per distinct ``row_weights`` value, ascending:
    the host's from ``weigh_rows``, else found from the batch (a wait on a device)."""
    groups = batch.get(WEIGHT_GROUPS)
    if groups is None:
        groups = _groups(scored_row_weights(batch["row_weights"], batch))
    return groups


def completion_token_count(batch: dict) -> int:
    """Completion tokens a batch scores, each row counted ``row_weights`` times (if set)."""
    weights = batch.get("row_weights")
    positions = batch.get(SCORED_POSITIONS)
    if weights is None and positions is not None:
        return int(positions.shape[0])  # the shape is the host's: no wait on the device
    if weights is not None and WEIGHT_GROUPS in batch:  # the host's groups: their shapes
        return sum(w * int(index.shape[0]) for w, index in batch[WEIGHT_GROUPS])
    per_row = (batch["completion_labels"] != -100).sum(dim=1)
    if weights is not None:
        per_row = per_row * weights.to(per_row.device)
    return int(per_row.sum())


def round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, max_len]`` ids and attention mask, padding on the left (the width rounded up to
    a multiple of ``multiple``)."""
    width = round_up(max((len(s) for s in sequences), default=0), multiple)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def build_scoring_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Tensors for one forward pass of student and teacher.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` of shape ``[B, P + C]``
    and ``completion_labels`` ``[B, C]`` (completion token ids, -100 on padding). ``multiple``
    rounds P and C up to multiples of it (padding masked and unscored: the same loss from
    fewer distinct shapes, for a compiled student that records a CUDA graph per shape).
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, multiple)
    width = round_up(max((len(c) for c in completions), default=0), multiple)
    comp_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    labels = torch.full((len(completions), width), -100, dtype=torch.long)
    comp_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for row, seq in enumerate(completions):
        if seq:
            comp_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            labels[row, : len(seq)] = comp_ids[row, : len(seq)]
            comp_mask[row, : len(seq)] = 1
    attention_mask = torch.cat([prompt_mask, comp_mask], dim=1)
    # positions count real tokens only, as generate() saw them with left padding
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.cat([prompt_ids, comp_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_labels": labels,
    }
