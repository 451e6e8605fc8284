"""Stage clocks for the step profilers: device-synced seconds per stage, and a trace of which
stages enter a ``torch.compile`` context (what decides inductor's cudagraph-tree generations)."""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict


class Clock:
    """Seconds per stage, device-synced, summed over one optimizer step."""

    def __init__(self, device, labelled: bool = False):
        from axolotl_gold.scoring.timing import synchronize

        self.sync = lambda: synchronize(device)  # noqa: E731
        self.seconds = defaultdict(float)
        self.labelled = labelled  # each stage also a profiler range named STAGE_LABEL + stage

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self.sync()
        start = time.perf_counter()
        with _range(STAGE_LABEL + stage) if self.labelled else contextlib.nullcontext():
            yield
            self.sync()  # inside the range: the stage's kernels end before it does
        self.seconds[stage] += time.perf_counter() - start


STAGE_LABEL = "stage: "


def _range(name: str):
    from torch.profiler import record_function

    return record_function(name)


def generations():
    """GOLD_TRACE_GENERATIONS=1: a callable that prints each stage, between the student's
    forward and its backward, that entered a ``torch.compile`` context (dynamo's generation
    counter moved). Under ``mode="reduce-overhead"`` such an entry lets inductor's cudagraph
    trees start a new generation at the backward, freeing the forward's saved tensors."""
    if os.environ.get("GOLD_TRACE_GENERATIONS") != "1":
        return lambda stage: None
    from torch._dynamo.mutation_guard import GenerationTracker

    seen = GenerationTracker.generation

    def trace(stage: str) -> None:
        nonlocal seen
        if GenerationTracker.generation != seen:
            print(f"[generations] {stage} entered torch.compile: {seen} -> {GenerationTracker.generation}", flush=True)
            seen = GenerationTracker.generation

    return trace
