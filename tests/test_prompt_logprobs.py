"""`teacher_server_mode: prompt_logprobs` without vLLM: its keys and their validation, and the
client's bounded retries on answers real vLLM never gives (malformed, truncated, slow), from a
small fake server. Against real vLLM: tests/with_vllm/test_prompt_logprobs_server.py."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import torch

from axolotl_gold.config.errors import GoldConfigError


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"teacher_server_mode": "topk"}, "is not a mode"),
        ({"teacher_server_mode": "prompt_logprobs", "teacher_server_top_k": 0}, "`teacher_server_top_k` must be >= 1"),
        ({"teacher_server_mode": "prompt_logprobs", "use_uld_loss": True}, "`use_uld_loss`"),
        ({"teacher_server_mode": "prompt_logprobs", "teacher_server_url": None}, "needs `teacher_server_url`"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(extra, message):
    from axolotl_gold.config.validation import validate_gold_settings

    data = {"teacher_model": "t", "teacher_server_url": "http://127.0.0.1:8000", **extra}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(GoldConfigError, match=message) as err:
        validate_gold_settings(data)
    assert "`teacher_server_" in str(err.value)


def test_settings_read_the_mode_and_top_k():
    from axolotl_gold.config.settings import GoldSettings
    from axolotl_gold.config.validation import validate_gold_settings

    s = GoldSettings.from_cfg({"teacher_model": "t"})
    assert (s.teacher_server.mode, s.teacher_server.top_k) == ("exact", 20)
    data = {"teacher_model": "t", "teacher_server_url": "http://h:1", "teacher_server_mode": "prompt_logprobs",
            "teacher_server_top_k": 7}
    validate_gold_settings(data)
    s = GoldSettings.from_cfg(data)
    assert (s.teacher_server.mode, s.teacher_server.top_k) == ("prompt_logprobs", 7)


def test_objective_is_the_top_k_tail_jsd():
    from axolotl_gold.assembly import build_objective
    from axolotl_gold.config.settings import GoldSettings
    from axolotl_gold.scoring.topk import TopKTailObjective

    s = GoldSettings.from_cfg({"teacher_model": "t", "teacher_server_url": "http://h:1",
                               "teacher_server_mode": "prompt_logprobs", "beta": 0.3, "loss_temperature": 2.0})
    cfg = type("C", (), {"vocab_size": 10})()
    model = type("M", (), {"config": cfg})()
    objective = build_objective(s, model, model, None)
    assert isinstance(objective, TopKTailObjective) and (objective.beta, objective.temperature) == (0.3, 2.0)


class _Fake(http.server.BaseHTTPRequestHandler):
    """vLLM's /v1/models and /tokenize, and a /v1/completions that answers wrongly."""

    mode = "garbage"
    calls = 0

    def log_message(self, *args):
        pass

    def _send(self, payload) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self._send({"data": [{"id": "teacher", "max_model_len": 256}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self._send({"tokens": [1, 2, 3]})
        type(self).calls += 1
        if self.mode == "slow":
            time.sleep(1.5)
        entry = lambda tok: {str(tok): {"logprob": -0.5, "rank": 1}, "4": {"logprob": -1.0, "rank": 2}}  # noqa: E731
        good = [[None] + [entry(t) for t in p[1:]] for p in request["prompt"]]
        answers = {
            "garbage": b"{not json",
            "short": {"choices": [{"index": 0, "prompt_logprobs": good[0][:-1]}]},
            "unlisted": {"choices": [{"index": 0, "prompt_logprobs": [None] + [{"4": {"logprob": -1.0}}] * (len(good[0]) - 1)}]},
            "too_many": {"choices": [{"index": 0, "prompt_logprobs": [None] + [{str(i): {"logprob": -3.0} for i in range(9)}] * (len(good[0]) - 1)}]},
            "slow": {"choices": [{"index": 0, "prompt_logprobs": good[0]}]},
        }
        self._send(answers[self.mode])


@pytest.mark.parametrize("mode,message", [
    ("garbage", "no complete answer"), ("short", "entries for a prompt of"), ("unlisted", "not listed"),
    ("too_many", "more than top-k"), ("slow", "timed out"),
])
def test_bad_answers_and_timeouts_raise_after_bounded_retries(mode, message):
    from axolotl_gold.models.remote.prompt_logprobs import PromptLogprobsTeacher
    from axolotl_gold.models.remote.teacher import TeacherServerError

    handler = type("Handler", (_Fake,), {"mode": mode, "calls": 0})
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        remote = PromptLogprobsTeacher(url, None, 10, top_k=2, model_id="teacher", timeout=0.5, retries=2, backoff=0.0)
        with pytest.raises(TeacherServerError, match=message) as err:
            remote.check_server()
        assert handler.calls == 2 and url in str(err.value)
    finally:
        fake.shutdown()


def test_ids_outside_the_vocabulary_raise_at_once():
    from axolotl_gold.models.remote.prompt_logprobs import PromptLogprobsTeacher

    handler = type("Handler", (_Fake,), {"mode": "slow", "calls": 0})
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        remote = PromptLogprobsTeacher(url, None, 4, top_k=2, model_id="teacher", timeout=5, retries=3, backoff=0.0)
        with pytest.raises(GoldConfigError, match="token id 4, outside the vocabulary of 4 ids"):
            remote.check_server()
        assert handler.calls == 1  # a configuration error is not retried
    finally:
        fake.shutdown()


def test_objective_fused_unfused_and_repeats_agree(tiny_pair):
    """The objective on the student's hidden states + head (fused) equals it on the student's
    logits; a row with ``row_weights`` 3 counts as three copies of it."""
    from transformers import AutoModelForCausalLM

    from axolotl_gold.data.batching import build_scoring_batch
    from axolotl_gold.scoring.forward import completion_states
    from axolotl_gold.scoring.topk import TopKStates, TopKTailObjective

    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32)
    prompts, completions = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17]]
    objective = TopKTailObjective(beta=0.5, temperature=1.0, chunk_size=3)

    def loss(rows_p, rows_c, weights=None):
        batch = build_scoring_batch(rows_p, rows_c, pad_id=0)
        if weights is not None:
            batch["row_weights"] = torch.tensor(weights)
        with torch.no_grad():
            lp = completion_states(teacher, batch, use_head_bypass=False).values.log_softmax(-1)
        top = lp.topk(8, -1)
        t = TopKStates(top.indices, top.values)
        fused = objective(completion_states(student, batch, use_head_bypass=True), t, batch)
        plain = objective(completion_states(student, batch, use_head_bypass=False), t, batch)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        return fused, objective.count(batch)

    weighted, count = loss(prompts, completions, [1, 3])
    repeated, count_repeated = loss([prompts[0]] + [prompts[1]] * 3, [completions[0]] + [completions[1]] * 3)
    torch.testing.assert_close(weighted, repeated, rtol=1e-5, atol=1e-6)
    assert count == count_repeated == 3 + 3 * 4
