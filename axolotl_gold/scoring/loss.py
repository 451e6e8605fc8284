"""The two stages of a GOLD step, free of any trainer: the window and the loss.

``GoldTrainer`` calls them from Axolotl's loop; benchmarks call them from a plain
PyTorch loop, so both measure the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch

from axolotl_gold.data.batching import Rollout, build_scoring_batch, completion_token_count, merge_repeats
from axolotl_gold.rollouts.window import Window, fill_window, generation_seed, policy_draws
from axolotl_gold.rollouts.engines.base import RolloutEngine
from axolotl_gold.scoring.forward import completion_states


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
    objective=None,
    vision=None,
) -> PreparedWindow:
    """Draw on/off-policy per slice, sample once for the window, build the batches.

    ``objective`` (optional) adds what its teacher needs to each batch
    (``teacher_inputs(rows)``, e.g. the teacher's own tokens and the alignment) and
    says how many units a batch scores (``count(batch)``); by default the units are
    the completion tokens. Identical consecutive rows of a slice (an off-policy
    prompt's repeats) become one row with ``batch["row_weights"]`` its count; counts
    and objectives weight by it, so the window's sum and token count are the
    repeated window's. ``vision`` (a ``VisionEncoder``, vision-language students)
    turns rows with images into the processor's tensors, for sampling and scoring.
    """
    draws = policy_draws(seed, step, len(slices), lmbda)
    start = perf_counter()
    window = fill_window(
        slices,
        draws,
        student_engine,
        generation_seed(seed, step, rank),
        teacher_engine,
        generation_seed(seed, step, rank, role="teacher"),
        encode=generation_inputs(vision) if vision is not None else None,
    )
    seconds = perf_counter() - start
    micro_batches = []
    for rows in window.slices:
        # repeats of a (prompt, dataset completion) are scored once, weighted
        rows, counts = merge_repeats(rows)
        batch = scoring_batch(rows, pad_id, vision)
        if any(c > 1 for c in counts):
            batch["row_weights"] = torch.tensor(counts, dtype=torch.long)
        extra = objective.teacher_inputs(rows) if objective is not None else None
        if extra:
            batch.update(extra)
        micro_batches.append(batch)
    count = objective.count if objective is not None else completion_token_count
    local = sum(int(count(m)) for m in micro_batches)
    return PreparedWindow(window, micro_batches, local, seconds)


def scoring_batch(rows: list[Rollout], pad_id: int, vision=None) -> dict:
    """The student's scoring batch of one slice (with the processor's tensors when
    a row has images)."""
    prompts = [r.prompt_ids for r in rows]
    completions = [r.completion_ids for r in rows]
    if vision is not None and any(r.images for r in rows):
        texts = [r.prompt_text for r in rows]
        return vision.scoring_batch(prompts, completions, texts, [r.images for r in rows])
    return build_scoring_batch(prompts, completions, pad_id)


def generation_inputs(vision):
    """Rows to the processor's left-padded prompt batch, for the rollout engine."""

    def encode(rows: list[Rollout]) -> dict:
        return vision.model_inputs(
            [r.prompt_text for r in rows], [r.images for r in rows], [r.prompt_ids for r in rows]
        )

    return encode


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
    total = objective(student_states, teacher_states, batch)
    return total, torch.as_tensor(objective.count(batch), device=total.device), teacher_seconds
