"""Test-only Axolotl plugin: NaN in the student's gradients at chosen optimizer steps.

``plugins: [poison_grads_plugin.PoisonGrads]`` (``tests/`` on PYTHONPATH) and
GOLD_TEST_POISON_STEPS="2" or "0,1,2": after the last micro-step of each listed step (0-based)
one trainable parameter's gradient gets a NaN, as a kernel's bad backward would leave it.
GOLD_TEST_POISON_LOSS=1: that micro-step's returned loss is NaN too (what HF's loop reads).
"""

import os

from axolotl.integrations.base import BasePlugin


class PoisonGrads(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        steps = {int(s) for s in os.environ.get("GOLD_TEST_POISON_STEPS", "").split(",") if s}
        original, per_step = trainer.training_step, cfg.gradient_accumulation_steps
        calls = {"n": 0}

        def training_step(model, inputs, num_items_in_batch=None):
            loss = original(model, inputs, num_items_in_batch)
            calls["n"] += 1
            if calls["n"] % per_step == 0 and trainer.state.global_step in steps:
                param = next(p for p in trainer.model.parameters() if p.requires_grad and p.grad is not None)
                param.grad.view(-1)[0] = float("nan")
                if os.environ.get("GOLD_TEST_POISON_LOSS") == "1":
                    loss = loss * float("nan")
            return loss

        trainer.training_step = training_step
