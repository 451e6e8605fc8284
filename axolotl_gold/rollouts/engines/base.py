"""The interface every rollout engine implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class RolloutEngine(Protocol):
    """Samples one completion per prompt, in one call for the whole window.

    ``calls`` counts ``generate`` calls (one per optimizer window is the contract).
    """

    calls: int

    def generate(
        self, prompts: list[list[int]], seed: int, model_inputs: dict | None = None
    ) -> list[list[int]]:
        """Completion token ids for each prompt, ending on EOS if EOS was sampled.

        ``model_inputs`` (prompts with images): the processor's left-padded batch of
        the same prompts (``input_ids``, ``attention_mask``, ``pixel_values``, ...);
        engines that cannot take images raise ``NotImplementedError``.
        """
        ...


def refuse_model_inputs(engine, model_inputs) -> None:
    if model_inputs is not None:
        raise NotImplementedError(
            f"{type(engine).__name__} samples from token ids only and cannot take images: "
            "use `gold_generation_engine: hf` for a vision-language student"
        )


def trim_completion(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Cut after the first EOS (kept, so the student learns to stop).

    Engines pad only *after* EOS, so cutting there drops all padding; a pad id the
    model samples mid-sequence is a real token and is kept.
    """
    out = []
    for token in ids:
        out.append(token)
        if token in eos_ids:
            break
    return out
