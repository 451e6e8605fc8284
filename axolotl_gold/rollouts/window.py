"""The optimizer-window buffer: one generation call, sliced across micro-steps.

State is derived, not stored: the on/off-policy draws of a window are a pure
function of ``(seed, global_step)`` and the prompts come from the window sampler, so
a run resumed from a checkpoint replays exactly the draws and prompts the
uninterrupted run would have used. Every process computes the same draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from axolotl_gold.data.batching import Rollout
from axolotl_gold.rollouts.engines.base import RolloutEngine


def policy_draws(seed: int, step: int, num_slices: int, lmbda: float) -> list[bool]:
    """Per micro-batch slice: True when it is sampled on-policy (probability ``lmbda``)."""
    rng = random.Random(f"gold:{seed}:{step}")  # str seeds hash with sha512: same on all ranks
    return [rng.random() < lmbda for _ in range(num_slices)]


def generation_seed(seed: int, step: int, rank: int, role: str = "student") -> int:
    return random.Random(f"gold-gen:{role}:{seed}:{step}:{rank}").getrandbits(63)


@dataclass
class Window:
    """One process's optimizer window after rollouts."""

    slices: list[list[Rollout]]
    on_policy: list[bool]

    @property
    def num_rows(self) -> int:
        return sum(len(s) for s in self.slices)

    def completion_lengths(self) -> list[int]:
        return [len(r.completion_ids) for s in self.slices for r in s]


def fill_window(
    slices: list[list[Rollout]],
    on_policy: list[bool],
    student: RolloutEngine,
    student_seed: int,
    teacher: RolloutEngine | None = None,
    teacher_seed: int = 0,
    encode: Callable[[list[Rollout]], dict] | None = None,
) -> Window:
    """Replace completions: on-policy slices by the student's samples, and, with a
    teacher engine (``seq_kd``), off-policy slices by the teacher's samples.

    Each engine is called at most once for the whole window: once when any slice
    needs its samples, never per micro-step. ``encode`` builds the model inputs of
    rows with images (a processor's tensors); the engine then samples from those.
    """
    if len(slices) != len(on_policy):
        raise ValueError(f"{len(slices)} slices but {len(on_policy)} draws")
    filled = [[Rollout(**vars(r)) for r in s] for s in slices]
    _sample_into(filled, [i for i, on in enumerate(on_policy) if on], student, student_seed, encode)
    if teacher is not None:
        _sample_into(
            filled, [i for i, on in enumerate(on_policy) if not on], teacher, teacher_seed, encode
        )
    return Window(slices=filled, on_policy=list(on_policy))


def _sample_into(slices, which: list[int], engine: RolloutEngine, seed: int, encode=None) -> None:
    rows = [row for i in which for row in slices[i]]
    if not rows:
        return
    prompts = [r.prompt_ids for r in rows]
    if encode is not None and any(r.images for r in rows):
        completions = engine.generate(prompts, seed=seed, model_inputs=encode(rows))
    else:
        completions = engine.generate(prompts, seed=seed)
    if len(completions) != len(rows):
        raise RuntimeError(f"engine returned {len(completions)} completions for {len(rows)} prompts")
    for row, completion in zip(rows, completions):
        row.completion_ids = list(completion)
        row.completion_text = ""  # decoded lazily by whoever needs the text
