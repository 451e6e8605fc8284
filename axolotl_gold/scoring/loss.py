"""The loss of one micro-step, free of any trainer: the slice's scoring batch, the
student's and the teacher's completion states, and the objective's sum and count.

``GoldTrainer`` calls it from Axolotl's loop; benchmarks call it from a plain PyTorch
loop, so both measure the same code.
"""

from __future__ import annotations

import torch

from axolotl_gold.data.batching import SCORED_POSITIONS, Rollout, build_scoring_batch, scored_positions
from axolotl_gold.scoring.forward import completion_states
from axolotl_gold.scoring.routing import objective_sum
from axolotl_gold.scoring.timing import Stopwatch, mark

TEACHER_SECONDS = "gold/time_teacher_s"


def scoring_batch(rows: list[Rollout], pad_id: int, vision=None, multiple: int = 1) -> dict:
    """The student's scoring batch of one slice (with the processor's tensors when
    a row has images; ``multiple``: text widths rounded up, ``build_scoring_batch``)."""
    prompts = [r.prompt_ids for r in rows]
    completions = [r.completion_ids for r in rows]
    if vision is not None and any(r.images for r in rows):
        texts = [r.prompt_text for r in rows]
        batch = vision.scoring_batch(prompts, completions, texts, [r.images for r in rows])
    else:
        batch = build_scoring_batch(prompts, completions, pad_id, multiple)
    # the scored positions, found here on the host: the loss selects them on the device
    # without waiting for it (``scored_rows``)
    batch[SCORED_POSITIONS] = scored_positions(batch["completion_labels"])
    return batch


def teacher_scoring_batch(rows: list[Rollout], pad_id: int, objective, vision=None, multiple: int = 1) -> dict:
    """``scoring_batch`` with what the objective's teacher reads (``teacher_inputs``: its own
    tokens and the alignment for another tokenizer) and, when rows name their teacher
    (``teacher_servers``), those names beside the tensors the teacher reads."""
    batch = scoring_batch(rows, pad_id, vision, multiple)
    batch.update(objective.teacher_inputs(rows) or {})
    names = [r.teacher for r in rows]
    if any(name is not None for name in names):
        batch.get("teacher", batch)["teacher_names"] = names
    return batch


def loss_total(
    student, teacher, batch: dict, objective, fused: bool, stopwatch: Stopwatch | None = None
) -> torch.Tensor:
    """The objective summed over the batch's scored units.

    The teacher reads ``batch["teacher"]`` when the objective put its own tokens
    there (another tokenizer), else the student's tensors. With a ``stopwatch``, the
    teacher's forward is its span ``TEACHER_SECONDS`` (the device's time on CUDA).
    """
    student_states = completion_states(student, batch, use_head_bypass=fused)
    device = batch["input_ids"].device
    start = mark(device) if stopwatch is not None else None  # no event where nothing is timed
    with torch.no_grad():
        teacher_states = completion_states(
            teacher, batch.get("teacher", batch), use_head_bypass=fused
        )
    if start is not None:
        stopwatch.add(TEACHER_SECONDS, start, mark(device))
    return objective_sum(objective, student_states, teacher_states, batch)


def loss_sum(
    student, teacher, batch: dict, objective, fused: bool, stopwatch: Stopwatch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``loss_total``, the count of scored units). The count is a host tensor: a count made
    on the device would be a blocking copy, a wait for everything queued (the trainer's
    micro-steps divide by the window's count instead and call ``loss_total``)."""
    total = loss_total(student, teacher, batch, objective, fused, stopwatch)
    return total, torch.tensor(objective.count(batch), dtype=torch.long)
