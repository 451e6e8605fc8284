"""Requests from several training processes served in one teacher forward.

The server's forward is one micro-batch at a time; with several training processes, their
requests queue behind it. ``RequestBatcher`` serves them together: a request that arrives
while a forward runs waits, and the next forward takes every waiting request (up to
``max_rows`` rows), stacked into one batch (``combine``), then hands each its own rows'
states (``split``). The first waiting thread runs the forward (no extra thread).

Stacking keeps each request's tokens where they attend: rows are left-padded to the widest
request with attention mask 0, their position ids (given, or ``0..L-1`` as a model
numbers an unpadded row) padded the same way, and the scored columns (the right edge of
each row) left-padded with ``False``; states come back in row order, so request ``i`` gets
the next ``scored_i.sum()`` of them.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


def combine(requests: list[dict]) -> dict:
    """One batch of ``requests`` (``wire.decode_request`` dicts), rows in request order."""
    width = max(r["input_ids"].shape[1] for r in requests)
    columns = max(r["scored"].shape[1] for r in requests)

    def left(t: torch.Tensor, to: int, value) -> torch.Tensor:
        pad = torch.full((t.shape[0], to - t.shape[1]), value, dtype=t.dtype, device=t.device)
        return torch.cat([pad, t], dim=1)

    out = {"input_ids": [], "attention_mask": [], "position_ids": [], "scored": []}
    for r in requests:
        rows, length = r["input_ids"].shape
        positions = r.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=r["input_ids"].device).expand(rows, length)
        out["input_ids"].append(left(r["input_ids"], width, 0))
        out["attention_mask"].append(left(r["attention_mask"], width, 0))
        out["position_ids"].append(left(positions, width, 0))
        out["scored"].append(left(r["scored"], columns, False))
    return {k: torch.cat(v) for k, v in out.items()}


def split(states: torch.Tensor, requests: list[dict]) -> list[torch.Tensor]:
    """Each request's ``[N_i, H]`` share of the combined batch's ``[sum N_i, H]`` states."""
    counts = [int(r["scored"].sum()) for r in requests]
    return list(torch.split(states, counts))


class _Slot:
    def __init__(self, request: dict):
        self.request = request
        self.result = None
        self.error: BaseException | None = None
        self.done = False


class RequestBatcher:
    """``submit(request)`` returns ``forward(request)``'s answer, computed together with
    the other requests waiting at the time (``forwards`` counts the forwards run)."""

    def __init__(self, forward: Callable[[dict], torch.Tensor], max_rows: int = 64):
        self.forward = forward
        self.max_rows = max(1, max_rows)
        self._cv = threading.Condition()
        self._queue: list[_Slot] = []
        self._busy = False
        self.forwards = 0

    def submit(self, request: dict) -> torch.Tensor:
        slot = _Slot(request)
        with self._cv:
            self._queue.append(slot)
            while not slot.done:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                batch = self._take()
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._busy = False
                    self._cv.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _take(self) -> list[_Slot]:
        """The waiting requests, oldest first, up to ``max_rows`` rows (at least one)."""
        taken, rows = [], 0
        while self._queue:
            n = self._queue[0].request["input_ids"].shape[0]
            if taken and rows + n > self.max_rows:
                break
            taken.append(self._queue.pop(0))
            rows += n
        return taken

    def _run(self, batch: list[_Slot]) -> None:
        requests = [s.request for s in batch]
        try:
            if len(requests) == 1:
                results = [self.forward(requests[0])]
            else:
                results = split(self.forward(combine(requests)), requests)
            self.forwards += 1
        except BaseException as err:  # every waiting request gets the error
            for s in batch:
                s.error, s.done = err, True
            return
        for s, result in zip(batch, results):
            s.result, s.done = result, True
