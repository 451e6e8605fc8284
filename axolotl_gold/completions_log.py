"""What the student writes: a table of sampled completions, scored row by row.

Every ``gold_log_completions_steps`` optimizer steps the trainer scores each row of
the window alone (one forward pass of each model per row, without gradient) and
appends one JSON line per row to ``<output_dir>/gold_completions.jsonl``::

    {"step": 10, "on_policy": true, "prompt": "...", "completion": "...",
     "length": 37, "loss": 0.41, "reverse_kl": 0.87}

``loss`` is the training objective per scored unit of that row (token, or aligned
position for ULD); ``reverse_kl`` (one vocabulary only) is KL(student || teacher)
per completion token over the full vocabulary at the loss temperature. The same
table goes to wandb when a wandb run is active (wandb is never imported here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

import torch

from axolotl_gold.batching import Rollout
from axolotl_gold.forward import completion_states
from axolotl_gold.objectives import JsdObjective
from axolotl_gold.step import scoring_batch

COMPLETIONS_LOG = "gold_completions.jsonl"
COLUMNS = ("step", "on_policy", "prompt", "completion", "length", "loss", "reverse_kl")


def row_scores(
    student,
    teacher,
    rows: list[Rollout],
    objective,
    pad_id: int,
    fused: bool,
    prepare: Callable[[dict], dict] = lambda b: b,
    vision=None,
) -> list[dict]:
    """Per row, ``{"loss": float | None, "reverse_kl": float | None}`` (None: nothing scored,
    or another vocabulary). Every row runs both forward passes, scored or not, so
    processes that shard weights (ZeRO-3) run the same number of passes."""
    reverse = dataclasses.replace(objective, beta=1.0) if isinstance(objective, JsdObjective) else None
    scores = []
    for row in rows:
        batch = scoring_batch([row], pad_id, vision)
        batch.update(objective.teacher_inputs([row]) or {})
        batch = prepare(batch)
        units = objective.count(batch)
        with torch.no_grad():
            s = completion_states(student, batch, use_head_bypass=fused)
            t = completion_states(teacher, batch.get("teacher", batch), use_head_bypass=fused)
            loss = float(objective(s, t, batch)) / units if units else None
            kl = float(reverse(s, t, batch)) / units if units and reverse is not None else None
        scores.append({"loss": loss, "reverse_kl": kl})
    return scores


def completion_records(
    step: int, rows: list[Rollout], on_policy: list[bool], scores: list[dict], decode
) -> list[dict]:
    """The table's rows (``COLUMNS``); ``decode`` turns token ids into text."""
    return [
        {
            "step": step,
            "on_policy": on,
            "prompt": decode(row.prompt_ids),
            "completion": decode(row.completion_ids),
            "length": len(row.completion_ids),
            **score,
        }
        for row, on, score in zip(rows, on_policy, scores)
    ]


def append_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def log_to_trackers(records: list[dict], report_to) -> bool:
    """The table to wandb when the run reports there and a wandb run is active
    (Axolotl's callback started it). Returns whether it was logged."""
    report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
    wandb = sys.modules.get("wandb")  # imported by its callback when in use
    if not ({"wandb", "all"} & set(report_to)) or wandb is None or getattr(wandb, "run", None) is None:
        return False
    table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in records])
    wandb.log({"gold/completions": table}, commit=False)
    return True
