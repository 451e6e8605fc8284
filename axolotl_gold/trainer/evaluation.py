"""Evaluation: the per-token divergence on held-out prompts, on- and off-policy.

Per eval batch the trainer scores the rows' dataset completions (off-policy) and,
with ``gold_eval_on_policy`` (default), samples the student once on the batch's
prompts and scores those samples (on-policy). Sums and unit counts accumulate over
the whole eval set and all processes; the metrics are sum / count, never a mean of
batch means, and a loss with nothing scored is left out rather than reported as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from axolotl_gold.data.batching import Rollout
from axolotl_gold.rollouts.window import fill_window, generation_seed
from axolotl_gold.rollouts.engines.base import RolloutEngine


@dataclass
class EvalTotals:
    onpolicy_sum: float = 0.0
    onpolicy_units: float = 0.0
    offpolicy_sum: float = 0.0
    offpolicy_units: float = 0.0
    sampled_tokens: float = 0.0
    sampled_rows: float = 0.0

    def reduced(self, accelerator) -> "EvalTotals":
        """Summed over processes."""
        if accelerator.num_processes == 1:
            return self
        values = torch.tensor(
            [getattr(self, f.name) for f in fields(self)], dtype=torch.float64, device=accelerator.device
        )
        values = accelerator.reduce(values, reduction="sum").tolist()
        return EvalTotals(*values)

    def metrics(self, prefix: str, on_policy: bool) -> dict[str, float]:
        """``{prefix}_loss`` (on-policy when ``on_policy``, else off-policy),
        ``{prefix}_offpolicy_loss`` (rows with completions) and
        ``{prefix}_completion_length`` (mean sampled tokens)."""
        out = {}
        if self.offpolicy_units:
            out[f"{prefix}_offpolicy_loss"] = self.offpolicy_sum / self.offpolicy_units
        if self.onpolicy_units:
            out[f"{prefix}_onpolicy_loss"] = self.onpolicy_sum / self.onpolicy_units
        if self.sampled_rows:
            out[f"{prefix}_completion_length"] = self.sampled_tokens / self.sampled_rows
        main = out.get(f"{prefix}_onpolicy_loss" if on_policy else f"{prefix}_offpolicy_loss")
        if main is not None:
            out[f"{prefix}_loss"] = main
        return out


def sample_eval_rows(
    rows: list[Rollout], engine: RolloutEngine, seed: int, batch_index: int, rank: int, encode=None
) -> list[Rollout]:
    """The student's completions for one eval batch, in one engine call; the seed
    depends on ``(seed, batch_index, rank)`` only, so every evaluation samples the
    same way and two evaluations differ by the model alone."""
    gen_seed = generation_seed(seed, batch_index, rank, role="eval")
    return fill_window([rows], [True], engine, gen_seed, encode=encode).slices[0]
