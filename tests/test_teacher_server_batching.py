"""The teacher server serves requests of several processes in one forward
(``models/remote/batching.py``): each gets the states it would get alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from axolotl_gold.data.batching import build_scoring_batch
from axolotl_gold.models.remote import wire
from axolotl_gold.models.remote.batching import RequestBatcher, combine, split
from axolotl_gold.models.remote.server import hidden_states


def _request(prompts, completions, positions=True):
    batch = build_scoring_batch(prompts, completions, pad_id=0)
    if not positions:
        batch.pop("position_ids", None)
    return wire.decode_request(wire.encode_request(batch), 10_000)


def _requests():
    return [
        _request([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]),
        _request([[20, 21, 22, 23, 24, 25]], [[26]]),  # wider prompt, one completion column
        _request([[30, 31], [32, 33], [34]], [[35, 36, 37, 38], [39], [40, 41]], positions=False),
    ]


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32).eval()


def test_combined_forward_gives_each_request_its_own_states(teacher):
    requests = _requests()
    alone = [hidden_states(teacher, r) for r in requests]
    together = split(hidden_states(teacher, combine(requests)), requests)
    assert [t.shape for t in together] == [a.shape for a in alone]
    for got, want in zip(together, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the padding is what keeps them apart: without it the wider prompt's rows would shift
    assert combine(requests)["attention_mask"][:2, 0].sum() == 0


def test_waiting_requests_share_a_forward_and_errors_reach_every_waiter(teacher):
    requests = _requests() * 2

    def slow(request):
        time.sleep(0.2)  # the forward runs while the other requests arrive
        return hidden_states(teacher, request)

    batcher = RequestBatcher(slow)
    results, start = {}, threading.Barrier(len(requests))

    def ask(i):
        start.wait()
        results[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert batcher.forwards < len(requests)
    for i, r in enumerate(requests):
        torch.testing.assert_close(results[i], hidden_states(teacher, r), rtol=1e-5, atol=1e-5)

    def broken(request):
        time.sleep(0.1)
        raise RuntimeError("out of memory")

    failing = RequestBatcher(broken)
    errors = []

    def ask_broken(request):
        try:
            failing.submit(request)
        except RuntimeError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=ask_broken, args=(r,)) for r in requests[:3]]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == ["out of memory"] * 3


def test_max_rows_bounds_a_forward(teacher):
    batcher = RequestBatcher(lambda r: hidden_states(teacher, r), max_rows=2)
    batcher._queue = [type("S", (), {"request": r})() for r in _requests()]
    assert len(batcher._take()) == 1  # 2 rows; the next (1 row) would make 3
    assert len(batcher._take()) == 1 and len(batcher._take()) == 1
