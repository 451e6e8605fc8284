"""A teacher per row (``teacher_servers``): a scoring batch split by rows, and the teachers'
answers kept with the rows they score.

Objectives return sums, so the loss of a batch whose rows have different teachers is the sum,
over teachers, of the objective on that teacher's rows: the student runs once on the whole
batch, each teacher on its own rows, and each group is scored against its own teacher's
states and output head (teachers need not share a head, nor a hidden size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axolotl_gold.data.batching import SCORED_POSITIONS, WEIGHT_GROUPS
from axolotl_gold.scoring.forward import CompletionStates


@dataclass
class RoutedStates:
    """Per teacher, ``(rows, states)``: the batch's row indices it scored (ascending) and its
    completion states of those rows, in that order (``CompletionStates`` or ``TopKStates``)."""

    groups: list[tuple[list[int], object]]


def batch_rows(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def take_rows(batch: dict, rows: list[int]) -> dict:
    """The scoring batch of ``rows`` alone (same columns and padding): every per-row tensor,
    list and nested batch (the teacher's own tokens) indexed by ``rows``; not the whole
    batch's ``scored_positions`` (the sub-batch's scored rows are its labels' mask)."""
    n = batch_rows(batch)
    out = {}
    for key, value in batch.items():
        if key in (SCORED_POSITIONS, WEIGHT_GROUPS):  # flat positions of the whole batch: the
            continue  # sub-batch finds its own from its labels' mask
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
            out[key] = value[torch.as_tensor(rows, dtype=torch.long, device=value.device)]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in rows]
        elif isinstance(value, dict) and "input_ids" in value:
            out[key] = take_rows(value, rows)
        else:
            raise ValueError(f"a scoring batch's `{key}` cannot be split by rows")
    return out


def take_states(states: CompletionStates, rows: list[int]) -> CompletionStates:
    """The completion states of ``rows`` (gradients flow back to the whole batch's)."""
    index = torch.as_tensor(rows, dtype=torch.long, device=states.values.device)
    return CompletionStates(values=states.values[index], head=states.head, compute_dtype=states.compute_dtype)


def objective_sum(objective, student: CompletionStates, teacher, batch: dict) -> torch.Tensor:
    """``objective(student, teacher, batch)``; with a teacher per row (``RoutedStates``) the
    sum of each teacher's rows scored against it."""
    if not isinstance(teacher, RoutedStates):
        return objective(student, teacher, batch)
    total = None
    for rows, states in teacher.groups:
        part = objective(take_states(student, rows), states, take_rows(batch, rows))
        total = part if total is None else total + part
    if total is None:  # an empty batch
        return student.values.sum() * 0.0
    return total
