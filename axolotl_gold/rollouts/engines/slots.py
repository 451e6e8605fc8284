"""The static engine's host-side schedule of one call: which prompt each slot holds, when
the host reads the stop flags, and what it does then.

A call has ``prompts`` prompts and ``slots`` rows on the device (as many as fit). The
first prompts start together; at each check a slot whose row stopped (EOS, or its last
token) takes the next waiting prompt, so a stopped row costs the steps until the next
check instead of the steps until its batch's longest row ends. Once no prompt waits and
half the rows stopped, the rest go on as a smaller batch (``compact``; with ``buckets``,
the compiled step's power-of-two row buckets, padded with stopped rows). Reading the
flags is a host sync, so a check comes every ``every`` token steps (None: no stop ids,
rows stop only at their last token) and at the step a row samples its last token (known
on the host: no row runs past its end waiting for a check).

Pure Python on host integers: the engine acts on what ``check`` returns, and
``benchmarks/ragged.py`` replays the same schedule from completion lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

# the fewest rows a compiled step compacts to (power-of-two buckets down to it)
COMPILE_MIN_ROWS = 4


def compiled_rows(live: int, batch: int) -> int:
    """The bucket for ``live`` rows still sampling out of ``batch``: the next power of
    two, at least ``COMPILE_MIN_ROWS``, at most ``batch``."""
    return min(batch, max(COMPILE_MIN_ROWS, 1 << max(0, live - 1).bit_length()))


@dataclass
class Check:
    """What a check decided: start prompts in slots (``started``: slot -> prompt), end
    the call (``done``), or go on with slots ``keep`` only (in that order)."""

    started: dict[int, int]
    done: bool = False
    keep: list[int] | None = None


class SlotQueue:
    def __init__(self, prompts: int, slots: int, max_new: int, every: int | None = None,
                 compact: bool = True, buckets: bool = False):
        self.prompts, self.max_new, self.every = prompts, max_new, every
        self.compact, self.buckets = compact, buckets
        self.next_prompt = 0
        self.holding = [-1] * slots  # the prompt each slot samples for (-1: none yet)
        self.started = [0] * slots  # the step count at which each slot sampled its token 0
        self.done = [True] * slots  # as of the last check (an empty slot is done)
        self.count = 0  # token steps run
        self.row_steps = 0  # rows those steps ran (stopped rows not yet dropped included)
        self.refills = 0  # prompts started in a slot another prompt had stopped in
        self.compactions = 0
        self.next_check = 0

    @property
    def waiting(self) -> int:
        return self.prompts - self.next_prompt

    def start(self, slots) -> dict[int, int]:
        """Slots ``slots`` (as many as prompts wait) take the next prompts: {slot: prompt}."""
        pairs = {}
        for slot in list(slots)[: self.waiting]:
            pairs[slot] = self.next_prompt
            self.next_prompt += 1
            self.holding[slot], self.started[slot], self.done[slot] = pairs[slot], self.count, False
        return pairs

    def check(self, finished: list[bool]) -> Check:
        """The stop flags read now (per slot): what to do, then the next check is planned."""
        self.done = list(finished)
        result = Check(self.start([slot for slot, stopped in enumerate(finished) if stopped]))
        self.refills += len(result.started)
        if not result.started:
            if all(finished):
                return Check({}, done=True)
            if self.compact and 2 * sum(finished) >= len(finished):
                result.keep = self._compaction(finished)
        self.plan()
        return result

    def _compaction(self, finished: list[bool]) -> list[int] | None:
        keep = [i for i, stopped in enumerate(finished) if not stopped]
        if self.buckets:
            size = compiled_rows(len(keep), len(finished))
            keep = (keep + [i for i, stopped in enumerate(finished) if stopped])[:size]
        if len(keep) == len(finished):
            return None
        for name in ("holding", "started", "done"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        self.compactions += 1
        return keep

    def plan(self) -> None:
        """The next check: the next multiple of ``every``, or the first step at which a
        row still sampling samples its last token, whichever comes first."""
        deadlines = [s + self.max_new - 1 for s, done in zip(self.started, self.done) if not done]
        candidates = deadlines + ([(self.count // self.every + 1) * self.every] if self.every else [])
        self.next_check = min(candidates) if candidates else self.count

    def stepped(self) -> None:
        self.count += 1
        self.row_steps += len(self.started)
