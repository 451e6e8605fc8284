"""The GPU suite's harness on this machine: a case the suite's deadline kills is reported
"stopped" (not passed, and not blamed on the case), a case that exits non-zero "failed"."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "gpu"))

from gpu_cases import Case, all_cases  # noqa: E402
from gpu_harness import PASSING, check, exit_verdict, launch  # noqa: E402


def test_a_run_killed_at_the_deadline_is_stopped_not_failed(tmp_path):
    # the real `axolotl train`: importing Axolotl alone takes longer than the 1 s it gets
    rc, log = launch({"base_model": str(tmp_path / "none")}, tmp_path, timeout=1)
    assert isinstance(rc, str) and rc.startswith("timeout")
    status, reason = exit_verdict(Case("full-bf16-static", {}), rc, log)
    assert status == "stopped" and status not in PASSING
    assert "GOLD_GPU_BUDGET_S" in reason


def test_a_nonzero_exit_fails_and_names_the_error():
    log = "Traceback (most recent call last):\nValueError: bad key `gold_x`\nsubprocess.CalledProcessError: x\n"
    status, reason = exit_verdict(Case("full-bf16-static", {}), 1, log)
    assert status == "failed"
    assert reason == "exit 1: ValueError: bad key `gold_x`"


@pytest.mark.parametrize("named", [True, False])
def test_flash_case_without_flash_attn_is_a_clear_error_only_when_axolotl_names_the_key(named):
    from gpu_cases import missing_module

    if missing_module("flash_attn") is None:
        pytest.skip("flash_attn is importable here: the case runs instead")
    flash = next(c for c in all_cases() if c.flash)
    log = "pydantic_core.ValidationError: 1 validation error\n" + ("set `attn_implementation`\n" if named else "")
    status, _ = exit_verdict(flash, 1, log)
    assert status == ("clear-error" if named else "failed")


def test_a_skipped_non_finite_step_is_a_problem_of_the_case(tmp_path):
    """The trainer skips a step whose gradients are not finite and trains on: the suite must
    not count such a run as passed."""
    history = [{"loss": 0.3, "gold/skipped_steps": 0}, {"loss": 0.3, "gold/skipped_steps": 1}, {"eval_loss": 0.2}]
    problems = check(Case("x"), {"student": str(tmp_path / "none")}, tmp_path, history)
    assert any("gold/skipped_steps [0, 1]" in p for p in problems), problems
    clean = [{"loss": 0.3, "gold/skipped_steps": 0}, {"eval_loss": 0.2}]
    others = check(Case("x"), {"student": str(tmp_path / "none")}, tmp_path, clean)
    assert not any("gold/skipped_steps" in p for p in others), others

