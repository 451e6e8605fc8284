"""A step whose gradients are not finite is not applied (``trainer.nonfinite``).

The CPU `axolotl train` runs put a NaN into the student's gradients at chosen steps
(``poison_grads_plugin``): a skipped last step leaves exactly the weights, optimizer state and
learning-rate schedule of the same run one step shorter (its NaN loss logged as it was), and
three such steps in a row stop the run with the error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from axolotl_gold.trainer.nonfinite import MAX_IN_A_ROW, NonFiniteGradients, NonFiniteSteps


def test_skips_non_finite_norms_and_stops_at_the_limit_in_a_row():
    steps = NonFiniteSteps(limit=3)
    assert not steps.skip(torch.tensor(1.5), 0)
    assert steps.skip(torch.tensor(float("nan")), 1)
    assert steps.skip(float("inf"), 2)
    assert not steps.skip(0.0, 3)  # a finite step ends the run of them
    assert steps.skip(float("nan"), 4) and steps.skip(float("nan"), 5)
    assert (steps.total, steps.in_a_row) == (4, 2)
    with pytest.raises(NonFiniteGradients, match=r"not finite .* in 3 optimizer steps in a row, the last step 6"):
        steps.skip(float("-inf"), 6)


def _poisoned(tiny_pair, tmp_path, monkeypatch, name: str, steps: str, **overrides):
    from axolotl_run import gold_config, run_train

    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("GOLD_TEST_POISON_STEPS", steps)
    cfg = gold_config(tiny_pair, tmp_path / name, plugins=["axolotl_gold.GoldPlugin", "poison_grads_plugin.PoisonGrads"],
                      **overrides)
    return run_train(cfg, tmp_path / name)


@pytest.mark.e2e
def test_a_non_finite_last_step_leaves_the_weights_of_the_shorter_run(tiny_pair, tmp_path, monkeypatch):
    from axolotl_run import log_history, weights

    monkeypatch.setenv("GOLD_TEST_POISON_LOSS", "1")  # the poisoned micro-step's loss is NaN too
    skipped = _poisoned(tiny_pair, tmp_path, monkeypatch, "skipped", "2", max_steps=3, save_steps=3)
    shorter = _poisoned(tiny_pair, tmp_path, monkeypatch, "shorter", "", max_steps=2, save_steps=2)
    a, b = weights(skipped), weights(shorter)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.isfinite(a[key]).all(), key
        assert torch.equal(a[key], b[key]), key  # nothing of the NaN step applied
    # the optimizer's moments and step counts, and the schedule's position: the shorter run's
    def saved(out, step, name):
        return torch.load(out / f"checkpoint-{step}" / name, weights_only=False)

    opt_a, opt_b = saved(skipped, 3, "optimizer.pt"), saved(shorter, 2, "optimizer.pt")
    sched_a, sched_b = saved(skipped, 3, "scheduler.pt"), saved(shorter, 2, "scheduler.pt")
    assert sched_a == sched_b and sched_a["last_epoch"] == 2  # not 3: the skipped step held it
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][key][name]), (key, name)
    steps = [h for h in log_history(skipped, 3) if "loss" in h]
    assert [h["gold/skipped_steps"] for h in steps] == [0, 0, 1]
    assert math.isnan(steps[2]["grad_norm"]) and math.isfinite(steps[1]["grad_norm"])
    # logged as it was: HF's logging_nan_inf_filter (a host wait per micro-step) is off, so the
    # NaN is not replaced by the average of the earlier losses
    assert math.isnan(steps[2]["loss"]) and math.isfinite(steps[1]["loss"])
    assert "step 2: gradient norm nan is not finite; the step is skipped" in (tmp_path / "skipped" / "log.txt").read_text()


@pytest.mark.e2e
def test_non_finite_steps_in_a_row_stop_the_run(tiny_pair, tmp_path, monkeypatch):
    poisoned = ",".join(str(s) for s in range(MAX_IN_A_ROW))
    with pytest.raises(AssertionError, match=r"NonFiniteGradients: the gradients were not finite \(norm nan\) in 3"):
        _poisoned(tiny_pair, tmp_path, monkeypatch, "broken", poisoned, max_steps=5, save_steps=5)
