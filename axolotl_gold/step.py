"""The two stages of a GOLD step, free of any trainer: the window and the loss.

``GoldTrainer`` calls them from Axolotl's loop; benchmarks call them from a plain
PyTorch loop, so both measure the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch

from axolotl_gold.batching import Rollout, build_scoring_batch
from axolotl_gold.buffer import Window, fill_window, generation_seed, policy_draws
from axolotl_gold.engines.base import RolloutEngine
from axolotl_gold.forward import completion_states


@dataclass
class PreparedWindow:
    window: Window
    micro_batches: list[dict[str, torch.Tensor]]
    local_tokens: int
    generation_seconds: float


def prepare_window(
    slices: list[list[Rollout]],
    *,
    step: int,
    seed: int,
    rank: int,
    lmbda: float,
    pad_id: int,
    student_engine: RolloutEngine,
    teacher_engine: RolloutEngine | None = None,
) -> PreparedWindow:
    """Draw on/off-policy per slice, sample once for the window, build the batches."""
    draws = policy_draws(seed, step, len(slices), lmbda)
    start = perf_counter()
    window = fill_window(
        slices,
        draws,
        student_engine,
        generation_seed(seed, step, rank),
        teacher_engine,
        generation_seed(seed, step, rank, role="teacher"),
    )
    seconds = perf_counter() - start
    micro_batches = [
        build_scoring_batch([r.prompt_ids for r in rows], [r.completion_ids for r in rows], pad_id)
        for rows in window.slices
    ]
    local = sum(int((m["completion_labels"] != -100).sum()) for m in micro_batches)
    return PreparedWindow(window, micro_batches, local, seconds)


def loss_sum(student, teacher, batch: dict, objective, fused: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(objective summed over the batch's scored tokens, their count, teacher seconds)."""
    mask = batch["completion_labels"] != -100
    student_states = completion_states(student, batch, use_head_bypass=fused)
    start = perf_counter()
    with torch.no_grad():
        teacher_states = completion_states(teacher, batch, use_head_bypass=fused)
    teacher_seconds = perf_counter() - start
    return objective(student_states, teacher_states, mask), mask.sum(), teacher_seconds
