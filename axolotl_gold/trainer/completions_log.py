"""What the student writes: a table of sampled completions, scored row by row.

Every ``gold_log_completions_steps`` optimizer steps the trainer scores each row of
the window alone (one forward pass of each model per row, without gradient) and
appends one JSON line per row to ``<output_dir>/gold_completions.jsonl``::

    {"step": 10, "on_policy": true, "prompt": "...", "completion": "...",
     "length": 37, "loss": 0.41, "reverse_kl": 0.87}

``loss`` is the training objective per scored unit of that row (token, or aligned
position for ULD); ``reverse_kl`` (one vocabulary only) is KL(student || teacher)
per completion token over the full vocabulary at the loss temperature. The same
table goes to the trackers the run reports to (wandb, trackio, TensorBoard, MLflow)
when their callbacks have started them (none is imported here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

import torch

from axolotl_gold.data.batching import Rollout
from axolotl_gold.scoring.forward import completion_states
from axolotl_gold.scoring.objectives import JsdObjective
from axolotl_gold.scoring.loss import teacher_scoring_batch
from axolotl_gold.scoring.routing import objective_sum

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
        batch = teacher_scoring_batch([row], pad_id, objective, vision)
        batch = prepare(batch)
        units = objective.count(batch)
        with torch.no_grad():
            s = completion_states(student, batch, use_head_bypass=fused)
            t = completion_states(teacher, batch.get("teacher", batch), use_head_bypass=fused)
            loss = float(objective_sum(objective, s, t, batch)) / units if units else None
            kl = float(objective_sum(reverse, s, t, batch)) / units if units and reverse is not None else None
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


def markdown_table(records: list[dict]) -> str:
    """The records as a markdown table (trackers that show text: TensorBoard, MLflow)."""

    def cell(value) -> str:
        text = "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in records]
    return "\n".join(lines)


def log_to_trackers(records: list[dict], report_to, callbacks=(), step: int = 0) -> list[str]:
    """The table to each tracker the run reports to and has started (by Axolotl's / HF's
    callbacks): wandb and trackio as tables, TensorBoard and MLflow as markdown text.
    No tracker is imported here. Returns the trackers written to."""
    report_to = {report_to} if isinstance(report_to, str) else set(report_to or [])
    wanted = lambda name: bool({name, "all"} & report_to)  # noqa: E731
    data = [[r[c] for c in COLUMNS] for r in records]
    logged = []
    wandb = sys.modules.get("wandb")  # imported by its callback when in use
    if wanted("wandb") and wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.log({"gold/completions": wandb.Table(columns=list(COLUMNS), data=data)}, commit=False)
        logged.append("wandb")
    trackio = sys.modules.get("trackio")
    if wanted("trackio") and trackio is not None and hasattr(trackio, "Table"):
        trackio.log({"gold/completions": trackio.Table(columns=list(COLUMNS), data=data)}, step=step)
        logged.append("trackio")
    for callback in callbacks:
        writer = getattr(callback, "tb_writer", None)  # HF's TensorBoardCallback, once training began
        if writer is not None and hasattr(writer, "add_text"):
            writer.add_text("gold/completions", markdown_table(records), global_step=step)
            logged.append("tensorboard")
    mlflow = sys.modules.get("mlflow")
    if wanted("mlflow") and mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_text(markdown_table(records), f"gold_completions/step_{step:07d}.md")
        logged.append("mlflow")
    return logged
