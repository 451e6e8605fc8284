"""benchmarks/stage_clock.py: the stage clock and the trace of stages that enter a
``torch.compile`` context (the trace decides where inductor's cudagraph trees may start a new
generation between a forward and its backward)."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from stage_clock import Clock, generations  # noqa: E402


def test_trace_names_only_the_stages_that_entered_torch_compile(monkeypatch, capsys):
    monkeypatch.setenv("GOLD_TRACE_GENERATIONS", "1")
    compiled = torch.compile(lambda x: x * 2, backend="eager")
    trace = generations()
    torch.ones(3).sum()  # eager work: no entry
    trace("eager stage")
    compiled(torch.ones(3))
    trace("compiled stage")
    trace("nothing since")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[generations] compiled stage entered torch.compile")


def test_trace_is_silent_unless_asked(monkeypatch, capsys):
    monkeypatch.delenv("GOLD_TRACE_GENERATIONS", raising=False)
    compiled = torch.compile(lambda x: x + 1, backend="eager")
    trace = generations()
    compiled(torch.ones(2))
    trace("compiled stage")
    assert capsys.readouterr().out == ""


def test_clock_sums_seconds_per_stage():
    clock = Clock(torch.device("cpu"))
    for _ in range(2):
        with clock("a"):
            time.sleep(0.005)
    with clock("b"):
        pass
    assert set(clock.seconds) == {"a", "b"} and clock.seconds["a"] > clock.seconds["b"] >= 0
