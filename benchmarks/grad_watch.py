"""Where gradients stop being finite in an `axolotl train` run (probe_graphed_cli.py).

``GradWatch`` is an Axolotl plugin (``plugins: [grad_watch.GradWatch]``, ``benchmarks/`` on
PYTHONPATH): after every micro-step's backward it appends to GOLD_GRAD_WATCH_OUT one JSON line
with the step, the micro-step, the loss, the micro-batch's width, how many trainable
parameters hold a non-finite gradient and the first of them by name. With
GOLD_GRAD_WATCH_MARK_STEP=1 it also calls ``torch.compiler.cudagraph_mark_step_begin()``
before every micro-step and evaluation batch (a candidate fix, tried through the plugin
before the trainer takes it); GOLD_GRAD_WATCH_SET="torch._inductor.config.triton.cudagraph_trees=False;..."
sets those attributes (literals) when the trainer is made, before anything compiles.
"""

from __future__ import annotations

import ast
import importlib
import json
import os

try:  # loaded by `axolotl train` as a plugin
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - a machine without axolotl
    BasePlugin = object


def nonfinite_grads(named_parameters) -> list[str]:
    """Names of the parameters whose ``.grad`` holds a NaN or an infinity."""
    return [name for name, p in named_parameters if p.grad is not None and not p.grad.isfinite().all()]


def set_attributes(spec: str) -> None:
    """``module.path.attr=literal;...``: each module imported, its attribute set."""
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        target, value = item.split("=", 1)
        parts = target.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix
            try:
                owner = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        setattr(owner, parts[-1], ast.literal_eval(value))


class GradWatch(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        path = os.environ.get("GOLD_GRAD_WATCH_OUT")
        if not path:
            return
        set_attributes(os.environ.get("GOLD_GRAD_WATCH_SET", ""))
        import torch

        original, calls = trainer.training_step, {"n": 0}
        mark_step = os.environ.get("GOLD_GRAD_WATCH_MARK_STEP") == "1"
        if mark_step:
            predict = trainer.prediction_step

            def prediction_step(*args, **kwargs):
                torch.compiler.cudagraph_mark_step_begin()
                return predict(*args, **kwargs)

            trainer.prediction_step = prediction_step

        def training_step(model, inputs, num_items_in_batch=None):
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            loss = original(model, inputs, num_items_in_batch)
            bad = nonfinite_grads(trainer.model.named_parameters())
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
            record = {"step": trainer.state.global_step, "micro": calls["n"], "loss": float(loss),
                      "width": None if ids is None else list(ids.shape), "nonfinite": len(bad),
                      "first": bad[:6]}
            calls["n"] += 1
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return loss

        trainer.training_step = training_step
