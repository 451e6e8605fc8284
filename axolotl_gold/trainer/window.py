"""One optimizer window, free of any trainer: the on/off-policy draws, ONE engine call
for the whole window, and each slice's scoring batch with what its teacher needs.

``GoldTrainer`` calls it from Axolotl's loop; benchmarks call it from a plain PyTorch
loop, so both measure the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch

from axolotl_gold.data.batching import Rollout, group_by_length, merge_repeats, weigh_rows
from axolotl_gold.rollouts.engines.base import RolloutEngine
from axolotl_gold.rollouts.window import Window, fill_window, generation_seed
from axolotl_gold.scoring.loss import teacher_scoring_batch
from axolotl_gold.vision.batch import rollout_inputs


@dataclass
class PreparedWindow:
    window: Window
    micro_batches: list[dict[str, torch.Tensor]]
    local_tokens: int
    generation_seconds: float


def prepare_window(
    slices: list[list[Rollout]],
    *,
    draws: list[bool],
    step: int,
    seed: int,
    rank: int,
    pad_id: int,
    student_engine: RolloutEngine,
    objective,
    teacher_engine: RolloutEngine | None = None,
    vision=None,
    width_multiple: int = 1,
) -> PreparedWindow:
    """Sample once for the window (slices drawn on-policy by ``draws``, from
    ``policy_draws``), then build the batches.

    ``objective`` adds what its teacher needs to each batch (``teacher_inputs(rows)``,
    e.g. the teacher's own tokens and the alignment) and says how many units a batch
    scores (``count(batch)``). Identical consecutive rows of a slice (an off-policy
    prompt's repeats) become one row with ``batch["row_weights"]`` its count; counts
    and objectives weight by it, so the window's sum and token count are the
    repeated window's. Micro-batches then hold rows of similar length
    (``group_by_length``), not necessarily a slice's. ``vision`` (a ``VisionEncoder``, vision-language students)
    turns rows with images into the processor's tensors, for sampling and scoring.
    ``width_multiple`` rounds the scoring batches' prompt and completion widths up to
    multiples of it (``gold_scoring_width_multiple``).
    """
    start = perf_counter()
    window = fill_window(
        slices,
        draws,
        student_engine,
        generation_seed(seed, step, rank),
        teacher_engine,
        generation_seed(seed, step, rank, role="teacher"),
        encode=rollout_inputs(vision) if vision is not None else None,
    )
    seconds = perf_counter() - start
    micro_batches = []
    # repeats of a (prompt, dataset completion) are scored once, weighted; then rows of
    # similar length share a micro-batch (the same sums, fewer padded positions)
    for rows, counts in group_by_length([merge_repeats(rows) for rows in window.slices]):
        batch = teacher_scoring_batch(rows, pad_id, objective, vision, width_multiple)
        if any(c > 1 for c in counts):
            weigh_rows(batch, counts)
        micro_batches.append(batch)
    local = sum(int(objective.count(m)) for m in micro_batches)
    return PreparedWindow(window, micro_batches, local, seconds)


