"""Seconds per stage of a training step, read without stalling the host mid-step.

On CUDA a span is a pair of events recorded on the current stream: the device's time from the
first to the second, read once both have run (``totals``, at logging, after the step's loss was
read). Waiting for the device to time a stage (``torch.cuda.synchronize`` before and after it)
kept the host from queueing the next stage's kernels while the device finished this one: on a
step of many short kernels the device then idles while the host launches. Elsewhere a span is
the host's clock, whose time is the work's (the CPU runs it in the call).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from time import perf_counter

import torch


@dataclass
class Mark:
    """One point of a span: a recorded CUDA event, or the host clock's reading."""

    event: torch.cuda.Event | None = None
    clock: float = 0.0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host timer started next measures only what
    follows (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mark(device: torch.device) -> Mark:
    """A point on ``device``'s queue (its current stream on CUDA), now."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return Mark(event=event)
    return Mark(clock=perf_counter())


def seconds_between(start: Mark, end: Mark) -> float:
    """The span's seconds; on CUDA waits for ``end`` to have run."""
    if start.event is not None:
        end.event.synchronize()
        return start.event.elapsed_time(end.event) / 1000.0
    return end.clock - start.clock


class Stopwatch:
    """Sums of spans per key, each added with a sign (a stage's time less a part of it that is
    another key's). CUDA spans wait in a list until their end has run; ``add`` folds those
    that have (so the list stays short), ``totals`` folds them all and clears the sums."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, Mark, Mark, float]] = []

    def add(self, key: str, start: Mark, end: Mark, sign: float = 1.0) -> None:
        self._pending.append((key, start, end, sign))
        self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        waiting = []
        for key, start, end, sign in self._pending:
            if wait or end.event is None or end.event.query():
                self._sums[key] += sign * seconds_between(start, end)
            else:
                waiting.append((key, start, end, sign))
        self._pending = waiting

    def totals(self) -> dict[str, float]:
        """Every key's sum since the last call (waits for the device's pending spans)."""
        self._fold(wait=True)
        sums, self._sums = dict(self._sums), defaultdict(float)
        return sums
