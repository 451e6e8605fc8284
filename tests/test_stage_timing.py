"""scoring.timing: spans summed per key with a sign, the teacher's span from loss_sum, and on CUDA
spans read from events with no wait on the device until the totals are read."""

import time

import pytest
import torch

from axolotl_gold.scoring.timing import Stopwatch, mark

CPU = torch.device("cpu")


def test_host_spans_sum_per_key_with_their_sign_and_totals_clear():
    watch = Stopwatch()
    a = mark(CPU)
    time.sleep(0.05)
    b = mark(CPU)
    time.sleep(0.02)
    c = mark(CPU)
    watch.add("step", a, c)
    watch.add("step", a, b, -1.0)  # the part of the step that is another stage's
    watch.add("teacher", a, b)
    totals = watch.totals()
    assert totals["teacher"] == pytest.approx(b.clock - a.clock)
    assert totals["step"] == pytest.approx(c.clock - b.clock)
    assert 0.015 < totals["step"] < totals["teacher"]
    assert watch.totals() == {}


def test_loss_sum_records_the_teachers_forward_as_its_span():
    from axolotl_gold.data.batching import build_scoring_batch
    from axolotl_gold.scoring.loss import TEACHER_SECONDS, loss_sum
    from axolotl_gold.scoring.objectives import JsdObjective
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    student, teacher = Qwen2ForCausalLM(cfg), Qwen2ForCausalLM(cfg)
    slow = 0.1

    def slow_forward(module, args, kwargs, output):
        time.sleep(slow)

    teacher.register_forward_hook(slow_forward, with_kwargs=True)
    batch = build_scoring_batch([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    watch = Stopwatch()
    total, count = loss_sum(student, teacher, batch, JsdObjective(beta=0.5, temperature=1.0, chunk_size=8, vocab_size=64), True, watch)
    seconds = watch.totals()[TEACHER_SECONDS]
    assert slow <= seconds < slow + 5.0
    assert int(count) == 5 and total.requires_grad
    # without a stopwatch nothing is timed and the sums are the same
    again, _ = loss_sum(student, teacher, batch, JsdObjective(beta=0.5, temperature=1.0, chunk_size=8, vocab_size=64), True)
    torch.testing.assert_close(again, total)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_cuda_spans_are_the_devices_time_and_never_wait_until_read(monkeypatch):
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize()
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: waits.append(1))
    watch = Stopwatch()
    host = time.perf_counter()
    for _ in range(3):
        start = mark(device)
        for _ in range(20):
            x = torch.tanh(x @ x) * 0.01
        watch.add("work", start, mark(device))
    queued = time.perf_counter() - host
    monkeypatch.undo()
    seconds = watch.totals()["work"]
    assert not waits  # the spans were added without waiting on the device
    # the host queued 60 matmuls of 4096^3 (~8 TFLOP) and went on; the device's time came later
    assert seconds > queued
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(60):
        x = torch.tanh(x @ x) * 0.01
    torch.cuda.synchronize()
    assert seconds == pytest.approx(time.perf_counter() - start, rel=0.3)

