"""The loss of one micro-step, free of any trainer: the slice's scoring batch, the
student's and the teacher's completion states, and the objective's sum and count.

``GoldTrainer`` calls it from Axolotl's loop; benchmarks call it from a plain PyTorch
loop, so both measure the same code.
"""

from __future__ import annotations

from time import perf_counter

import torch

from axolotl_gold.data.batching import Rollout, build_scoring_batch
from axolotl_gold.scoring.forward import completion_states
from axolotl_gold.scoring.routing import objective_sum


def scoring_batch(rows: list[Rollout], pad_id: int, vision=None, multiple: int = 1) -> dict:
    """The student's scoring batch of one slice (with the processor's tensors when
    a row has images; ``multiple``: text widths rounded up, ``build_scoring_batch``)."""
    prompts = [r.prompt_ids for r in rows]
    completions = [r.completion_ids for r in rows]
    if vision is not None and any(r.images for r in rows):
        texts = [r.prompt_text for r in rows]
        return vision.scoring_batch(prompts, completions, texts, [r.images for r in rows])
    return build_scoring_batch(prompts, completions, pad_id, multiple)


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so host timers measure it (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_sum(student, teacher, batch: dict, objective, fused: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(objective summed over the batch's scored units, their count, teacher seconds).

    The teacher reads ``batch["teacher"]`` when the objective put its own tokens
    there (another tokenizer), else the student's tensors.
    """
    student_states = completion_states(student, batch, use_head_bypass=fused)
    device = batch["input_ids"].device
    synchronize(device)  # the student's queued forward is not the teacher's time
    start = perf_counter()
    with torch.no_grad():
        teacher_states = completion_states(
            teacher, batch.get("teacher", batch), use_head_bypass=fused
        )
    synchronize(device)
    teacher_seconds = perf_counter() - start
    total = objective_sum(objective, student_states, teacher_states, batch)
    return total, torch.as_tensor(objective.count(batch), device=total.device), teacher_seconds
