"""Scores for slice k+1 are requested while the student trains on slice k.

A teacher server answers over HTTP, so its time is the network's and the server's, not
this process's. When a window is ready, ``TeacherPrefetch.submit`` prepares every
micro-batch's request (on the host, from the batch as it leaves the window) and hands
them, in order, to one worker thread that posts them one at a time; the micro-step then
``take``s its answer (waiting only if it has not arrived) and places it on the device.
The first micro-step still waits for its own answer; every later one finds its answer
requested while the student computed the one before.

Answers are matched to micro-batches by content (token ids, mask, scored positions), so
the batch may be copied to the device on the way; a batch that was not submitted (an
evaluation batch) is scored on the spot. An answer that failed raises at ``take``, in the
micro-step that needs it: nothing is trained on a partial window.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def batch_key(batch: dict) -> str:
    """What a teacher request depends on: token ids, attention mask, scored positions
    (and position ids when given), wherever the tensors are."""
    h = hashlib.sha1()
    for name in ("input_ids", "attention_mask", "completion_labels", "position_ids"):
        value = batch.get(name)
        if value is None:
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TeacherPrefetch:
    """Requests of a window's micro-batches, posted ahead by one worker thread.

    ``teacher`` has ``prepare(batch) -> request`` (host side), ``fetch(request) ->
    answer`` (HTTP only: safe off the main thread) and ``place(request, answer, batch,
    use_head_bypass)`` (builds the device tensors).
    """

    def __init__(self, teacher):
        self.teacher = teacher
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, deque[tuple[object, Future]]] = {}
        self.submitted = 0
        self.taken = 0

    def submit(self, batches: list[dict]) -> None:
        """Post ``batches``' requests in order (answers of an earlier window not taken
        are dropped)."""
        self.cancel()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gold-teacher")
        for batch in batches:
            request = self.teacher.prepare(batch)
            future = self._pool.submit(self.teacher.fetch, request)
            self._pending.setdefault(batch_key(batch), deque()).append((request, future))
            self.submitted += 1

    def take(self, batch: dict):
        """(request, answer) submitted for ``batch``, or None if it was not submitted."""
        queue = self._pending.get(batch_key(batch)) if self._pending else None
        if not queue:
            return None
        request, future = queue.popleft()
        self.taken += 1
        return request, future.result()  # a failed request raises here

    def cancel(self) -> None:
        for queue in self._pending.values():
            for _, future in queue:
                future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
