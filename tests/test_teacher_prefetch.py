"""Teacher-server scores for slice k+1 requested while the student trains on slice k
(``models/remote/prefetch.py``), against the same server asked on the spot."""

from __future__ import annotations

import time

import pytest
import torch

from axolotl_gold.models.remote.prefetch import batch_key
from axolotl_gold.models.remote.teacher import TeacherServerError, connect_teacher

from test_teacher_server import _batch, free_port, server, settings_for  # noqa: F401 (fixture)


def _batches():
    first, second = _batch(), _batch()
    second["input_ids"] = (second["input_ids"] + 7) % 200
    return [first, second]


def _wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_batch_key_follows_content_not_the_object():
    a, b = _batches()
    assert batch_key(a) == batch_key({k: v.clone() for k, v in a.items()})
    assert batch_key(a) != batch_key(b)
    c = _batch()
    c["completion_labels"][1, -1] = -100  # another scored set: another request
    assert batch_key(c) != batch_key(a)


def test_prefetched_answers_equal_answers_asked_on_the_spot(server, tiny_pair):  # noqa: F811
    remote = connect_teacher(settings_for(tiny_pair, server), torch.device("cpu"))
    batches = _batches()
    direct = [remote.completion_states(b, True).values for b in batches]
    before = remote.requests
    remote.prefetch(batches)
    first = remote.completion_states(batches[0], True)
    # while the student would train on slice 0, slice 1's request goes out on its own
    assert _wait_for(lambda: remote.requests - before == 2)
    copy = {k: v.clone() for k, v in batches[1].items()}  # as the trainer moves it: matched by content
    second = remote.completion_states(copy, True)
    assert remote.requests - before == 2  # answered from the prefetch
    assert first.head is remote.lm_head
    assert torch.equal(first.values, direct[0]) and torch.equal(second.values, direct[1])
    # a batch that was not submitted (evaluation) is asked on the spot
    remote.completion_states(batches[0], True)
    assert remote.requests - before == 3
    # logits when the head is not bypassed, through the prefetch too
    remote.prefetch(batches[:1])
    logits = remote.completion_states(batches[0], False).values
    torch.testing.assert_close(logits, remote.lm_head(direct[0]))


def test_a_failed_prefetched_request_raises_in_the_micro_step_that_needs_it(server, tiny_pair):  # noqa: F811
    remote = connect_teacher(settings_for(tiny_pair, server, teacher_server_retries=1), torch.device("cpu"))
    url = remote.url
    remote.url = f"http://127.0.0.1:{free_port()}"  # the server went away after the start check
    remote.backoff = 0.0
    batch = _batch()
    remote.prefetch([batch])
    with pytest.raises(TeacherServerError, match="did not answer"):
        remote.completion_states(batch, True)
    remote.url = url
    assert remote.completion_states(batch, True).values.abs().sum() > 0
