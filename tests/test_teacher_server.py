"""The teacher server (exact mode): wire format, the server in a subprocess on loopback,
gradients equal to the local teacher's (JSD, hybrid ULD), clear errors, `axolotl train` e2e."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.models.remote import wire
from axolotl_gold.models.remote.teacher import (
    RemoteTeacher,
    TeacherServerError,
    connect_teacher,
    load_output_head,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from axolotl_run import gold_config, relative_l2, run_train, sgd_delta  # noqa: E402
from server_process import stop  # noqa: E402,F401 (also imported from here by test_teacher_servers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "axolotl_gold.models.teacher_server", "--model", model,
         "--port", str(port), "--device", "cpu", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"teacher server exited: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("teacher server did not start in 180 s")


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    proc, url = start_server(tiny_pair["teacher"], tmp_path_factory.mktemp("ts") / "server.log")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def cross_server(tiny_cross_pair, tmp_path_factory):
    proc, url = start_server(tiny_cross_pair["teacher"], tmp_path_factory.mktemp("tsx") / "server.log")
    yield url
    stop(proc)


def settings_for(pair, url, **extra):
    from axolotl_gold.config.settings import GoldSettings

    cfg = {"teacher_model": pair["teacher"], "sequence_len": 64, "max_completion_length": 12,
           "teacher_server_url": url, **extra}
    return GoldSettings.from_cfg(cfg)


# --------------------------------------------------------------------------- wire format


def _batch():
    from axolotl_gold.data.batching import build_scoring_batch

    return build_scoring_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)


def test_request_round_trip():
    batch = _batch()
    got = wire.decode_request(wire.encode_request(batch), vocab_size=100)
    assert torch.equal(got["input_ids"], batch["input_ids"])
    assert torch.equal(got["attention_mask"], batch["attention_mask"])
    assert torch.equal(got["position_ids"], batch["position_ids"])
    assert torch.equal(got["scored"], batch["completion_labels"] != -100)
    assert got["scored"].sum() == 5


def test_response_round_trip_and_size():
    states = torch.randn(5, 8).to(torch.bfloat16)
    body = wire.encode_response(states, "abc")
    assert torch.equal(wire.decode_response(body, 5, 8, "abc"), states)
    assert len(body) < 5 * 8 * 2 + 200  # the states plus a small header


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t, m: t.pop("scored"), "no `scored`"),
        (lambda t, m: m.update(format="other/0"), "format"),
        (lambda t, m: t.update(attention_mask=t["attention_mask"][:, 1:].contiguous()), "attention_mask"),
        (lambda t, m: t.update(input_ids=t["input_ids"] + 1000), "token ids must be in"),
        (lambda t, m: t.update(scored=torch.ones(2, 9, dtype=torch.uint8)), "completion columns"),
        (lambda t, m: t.update(extra=torch.zeros(1)), "unknown tensors"),
        (lambda t, m: t.update(input_ids=t["input_ids"].float()), "integer"),
    ],
)
def test_malformed_requests_are_refused(mutate, message):
    from safetensors.torch import load, save

    tensors = load(wire.encode_request(_batch()))
    metadata = {"format": wire.FORMAT}
    mutate(tensors, metadata)
    with pytest.raises(wire.PayloadError, match=message):
        wire.decode_request(save(tensors, metadata=metadata), vocab_size=100)


def test_malformed_answers_are_refused():
    states = torch.randn(5, 8)
    body = wire.encode_response(states, "abc")
    for bad, message in [
        (body[: len(body) - 7], "not a complete safetensors"),  # truncated: a partial answer
        (b"", "empty"),
        (b"not safetensors at all", "not a complete safetensors"),
    ]:
        with pytest.raises(wire.PayloadError, match=message):
            wire.decode_response(bad, 5, 8, "abc")
    with pytest.raises(wire.PayloadError, match="shape"):
        wire.decode_response(body, 4, 8, "abc")
    with pytest.raises(wire.PayloadError, match="another output head"):
        wire.decode_response(body, 5, 8, "xyz")
    with pytest.raises(wire.PayloadError, match="non-finite"):
        wire.decode_response(wire.encode_response(states.index_fill(0, torch.tensor([1]), float("nan")), "abc"), 5, 8, "abc")


def test_head_digest_follows_the_served_dtype():
    w = torch.randn(6, 4)
    assert wire.head_digest(w, None, torch.bfloat16) == wire.head_digest(w.bfloat16().float(), None, torch.bfloat16)
    assert wire.head_digest(w, None, torch.float32) != wire.head_digest(w * 1.001, None, torch.float32)


# --------------------------------------------------------------------------- the head alone


@pytest.mark.parametrize("tied", [False, True])
def test_output_head_read_alone(tiny_pair, tmp_path, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_pair["teacher"]
    if tied:
        config = AutoConfig.from_pretrained(path)
        config.tie_word_embeddings = True
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config)
        path = str(tmp_path / "tied")
        model.save_pretrained(path)
        want = model.get_input_embeddings().weight
    else:
        want = AutoModelForCausalLM.from_pretrained(path).get_output_embeddings().weight
    _, head = load_output_head(path, None, torch.float32, torch.device("cpu"))
    assert torch.equal(head.weight, want) and not head.weight.requires_grad


# --------------------------------------------------------------------------- the server


def test_health_names_the_model(server, tiny_pair):
    info = requests.get(server + "/health", timeout=10).json()
    assert info["model"] == tiny_pair["teacher"] and info["format"] == wire.FORMAT
    assert (info["hidden_size"], info["dtype"], info["head_bias"]) == (128, "float32", False)


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_server_states_in_process(tiny_pair, device_map):
    """The server's forward (``--device-map auto`` included: the loader places the layers)
    returns the local teacher's final hidden states at the scored positions only."""
    from transformers import AutoModelForCausalLM

    from axolotl_gold.models.remote.server import hidden_states, load
    from axolotl_gold.scoring.forward import completion_states

    model = load(tiny_pair["teacher"], "float32", "cpu", device_map=device_map)
    batch = _batch()
    got = hidden_states(model, wire.decode_request(wire.encode_request(batch), 1000))
    local = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = completion_states(local, batch, use_head_bypass=True).values
    assert got.shape == (5, 128)
    torch.testing.assert_close(got, want[batch["completion_labels"] != -100], rtol=1e-6, atol=1e-6)


def test_bad_request_is_a_400_with_the_reason(server):
    response = requests.post(server + "/hidden_states", data=b"garbage", timeout=10)
    assert response.status_code == 400 and "safetensors" in response.json()["error"]


def test_remote_states_equal_local_and_concurrent_clients(server, tiny_pair):
    from transformers import AutoModelForCausalLM

    from axolotl_gold.scoring.forward import completion_states

    remote = connect_teacher(settings_for(tiny_pair, server), torch.device("cpu"))
    local = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32).eval()
    batch = _batch()
    with torch.no_grad():
        want = completion_states(local, batch, use_head_bypass=True).values
    got = completion_states(remote, batch, use_head_bypass=True)
    mask = batch["completion_labels"] != -100
    assert got.head is remote.lm_head
    torch.testing.assert_close(got.values[mask], want[mask], rtol=1e-6, atol=1e-6)
    assert got.values[~mask].abs().sum() == 0  # unscored positions are not sent
    # logits when the head is not bypassed (`gold_fused_loss: false`)
    with torch.no_grad():
        logits = completion_states(local, batch, use_head_bypass=False).values
    torch.testing.assert_close(completion_states(remote, batch, False).values[mask], logits[mask], rtol=1e-5, atol=1e-6)

    # several training processes at once: served one at a time, each its own answer
    results = {}

    def ask(i):
        b = _batch()
        b["input_ids"] = (b["input_ids"] + i) % 200
        results[i] = remote.completion_states(b, True).values

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(4):
        b = _batch()
        b["input_ids"] = (b["input_ids"] + i) % 200
        with torch.no_grad():
            torch.testing.assert_close(results[i][mask], completion_states(local, b, True).values[mask], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- gradients


def _rows(pair, tok, n):
    from axolotl_gold.data.batching import Rollout

    rows = []
    for line in open(pair["train"]).read().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        completion = messages[-1]["content"] + tok.eos_token
        rows.append(Rollout(
            prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"],
            completion_ids=tok(completion, add_special_tokens=False)["input_ids"],
            prompt_messages=messages[:-1], completion_text=completion,
        ))
    return rows


@pytest.mark.parametrize("loss,fused", [("jsd", True), ("jsd", False), ("hybrid_uld", True)])
def test_gradients_equal_the_local_teacher(request, loss, fused):
    """Student gradients of a window scored by the server equal those of the same teacher
    loaded locally (float32; relative L2 < 1e-5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_gold.assembly import build_objective
    from axolotl_gold.scoring.loss import loss_sum, scoring_batch

    uld = loss != "jsd"
    pair = request.getfixturevalue("tiny_cross_pair" if uld else "tiny_pair")
    url = request.getfixturevalue("cross_server" if uld else "server")
    tok = AutoTokenizer.from_pretrained(pair["student"])
    student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32)
    local = AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float32).eval()
    settings = settings_for(pair, url, use_uld_loss=uld, uld_use_hybrid_loss=uld, gold_fused_loss=fused, beta=0.5)
    remote = connect_teacher(settings, torch.device("cpu"))
    objective = build_objective(settings, student, remote, tok)
    rows = _rows(pair, tok, 6)
    batches = []
    for i in range(0, len(rows), 3):
        batch = scoring_batch(rows[i : i + 3], tok.pad_token_id)
        batch.update(objective.teacher_inputs(rows[i : i + 3]) or {})
        batches.append(batch)
    if uld:  # the server got the teacher's own tokens
        assert not torch.equal(batches[0]["teacher"]["input_ids"][:, -4:], batches[0]["input_ids"][:, -4:])
    total = sum(objective.count(b) for b in batches)

    def grad(teacher):
        student.zero_grad()
        losses = []
        for batch in batches:
            value, _ = loss_sum(student, teacher, batch, objective, fused)
            (value / total).backward()
            losses.append(float(value))
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]), losses

    want, want_losses = grad(local)
    requests_before = remote.requests
    got, got_losses = grad(remote)
    assert remote.requests - requests_before == len(batches)
    assert want.norm() > 0
    error = float((got - want).norm() / want.norm())
    print(f"{loss} fused={fused}: relative L2 of the student gradient {error:.2e}")
    assert error < 1e-5
    assert got_losses == pytest.approx(want_losses, rel=1e-6)


# --------------------------------------------------------------------------- errors


def test_unreachable_server_names_the_url_and_the_command(tiny_pair):
    url = f"http://127.0.0.1:{free_port()}"
    config, head = load_output_head(tiny_pair["teacher"], None, torch.float32, "cpu")
    remote = RemoteTeacher(url, config, head, model_id=tiny_pair["teacher"], retries=2, backoff=0.0)
    start = time.time()
    with pytest.raises(TeacherServerError) as err:
        remote.check_server()
    assert time.time() - start < 10  # bounded
    message = str(err.value)
    assert url in message and "after 2 tries" in message
    assert f"python -m axolotl_gold.models.teacher_server --model {tiny_pair['teacher']}" in message
    assert "`teacher_server_url`" in message


def test_server_of_another_model_is_refused(server, tiny_pair, tiny_cross_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    # another vocabulary (the cross-tokenizer teacher's)
    with pytest.raises(GoldConfigError, match="vocab_size") as err:
        connect_teacher(settings_for(tiny_cross_pair, server), "cpu")
    assert "teacher_model" in str(err.value) and server in str(err.value)
    # the same architecture and sizes, another head
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"])
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    other = str(tmp_path / "other")
    model.save_pretrained(other)
    with pytest.raises(GoldConfigError, match="output head differs"):
        connect_teacher(settings_for({"teacher": other}, server), "cpu")


def test_early_check_before_any_model_loads(server, tiny_pair, tiny_cross_pair):
    from axolotl_gold.models.remote.teacher import check_teacher_server

    assert check_teacher_server(settings_for(tiny_pair, server))["model"] == tiny_pair["teacher"]
    with pytest.raises(GoldConfigError, match="vocab_size"):
        check_teacher_server(settings_for(tiny_cross_pair, server))
    with pytest.raises(TeacherServerError, match="python -m axolotl_gold.models.teacher_server"):
        check_teacher_server(settings_for(tiny_pair, f"http://127.0.0.1:{free_port()}", teacher_server_retries=1))


class _Fake(http.server.BaseHTTPRequestHandler):
    """A server that answers /health like the real one and /hidden_states wrongly."""

    health: dict = {}
    mode = "garbage"
    calls = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps(self.health).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "truncated":
            full = wire.encode_response(torch.ones(5, 128), self.health["head_sha256"])
            body = full[: len(full) // 2]
        else:
            body = b"\x00" * 64
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.mark.parametrize("mode,message", [
    ("garbage", "no complete answer"), ("truncated", "no complete answer"), ("slow", "timed out"),
])
def test_bad_answers_and_timeouts_raise_after_bounded_retries(server, tiny_pair, mode, message):
    health = requests.get(server + "/health", timeout=10).json()
    handler = type("Handler", (_Fake,), {"health": health, "mode": mode, "calls": 0})
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        config, head = load_output_head(tiny_pair["teacher"], None, torch.float32, "cpu")
        remote = RemoteTeacher(url, config, head, model_id=tiny_pair["teacher"], timeout=0.5, retries=2, backoff=0.0)
        remote.check_server()
        with pytest.raises(TeacherServerError, match=message) as err:
            remote.completion_states(_batch(), True)
        assert handler.calls == 2 and url in str(err.value)
    finally:
        fake.shutdown()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"teacher_server_url": "localhost:8012"}, "must be an http"),
        ({"seq_kd": True}, "seq_kd"),
        ({"processor_type": "AutoProcessor", "skip_prepare_dataset": True}, "processor_type"),
        ({"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}, "FSDP"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "ZeRO-3"),
        ({"teacher_server_timeout": 0}, "teacher_server_timeout"),
        ({"teacher_server_retries": 0}, "teacher_server_retries"),
    ],
)
def test_unsupported_combinations_are_refused(extra, message):
    from axolotl_gold.config.validation import validate_gold_settings

    data = {"teacher_model": "t", "teacher_server_url": "http://127.0.0.1:8012", **extra}
    with pytest.raises(GoldConfigError, match=message) as err:
        validate_gold_settings(data)
    assert "`teacher_server_" in str(err.value)


def test_server_url_without_teacher_model_is_refused():
    from axolotl_gold.config.schema import GoldArgs

    with pytest.raises(Exception, match="teacher_server_url"):
        GoldArgs.model_validate({"plugins": ["axolotl_gold.GoldPlugin"], "teacher_server_url": "http://x:1"})


def test_settings_read_the_server_keys():
    from axolotl_gold.config.schema import gold_defaults
    from axolotl_gold.config.settings import GoldSettings

    s = GoldSettings.from_cfg({"teacher_model": "t"})
    assert s.teacher_server.url is None
    assert s.teacher_server.timeout == gold_defaults()["teacher_server_timeout"]
    s = GoldSettings.from_cfg({"teacher_model": "t", "teacher_server_url": "http://h:1", "teacher_server_retries": 5})
    assert (s.teacher_server.url, s.teacher_server.retries) == ("http://h:1", 5)


# --------------------------------------------------------------------------- axolotl train


@pytest.mark.e2e
def test_axolotl_train_with_the_teacher_server_equals_the_local_teacher(server, tiny_pair, tmp_path):
    """One SGD step (lr 1) through `axolotl train`: the teacher served equals the teacher
    loaded locally; then an on-policy run with evaluation through the server."""
    def served():
        return requests.get(server + "/health", timeout=10).json()["served_requests"]

    local, _ = sgd_delta(tiny_pair, tmp_path, "local", 2, 2, 1)
    before = served()
    remote, _ = sgd_delta(tiny_pair, tmp_path, "remote", 2, 2, 1, teacher_server_url=server)
    assert served() - before == 2  # the window's two micro-batches, scored by the server
    error = relative_l2(remote, local)
    print(f"axolotl train, one SGD step: relative L2 remote vs local {error:.2e}")
    assert error < 1e-5
    before = served()
    cfg = gold_config(tiny_pair, tmp_path / "onpolicy", teacher_server_url=server, max_steps=2,
                      save_steps=2, val_set_size=0.1, eval_steps=2)
    out = run_train(cfg, tmp_path / "onpolicy")
    assert (out / "model.safetensors").exists()
    assert served() - before >= 4  # 2 steps x 2 micro-batches, and the evaluation


@pytest.mark.e2e
def test_axolotl_train_cross_tokenizer_with_the_teacher_server(cross_server, tiny_cross_pair, tmp_path):
    """Hybrid ULD through `axolotl train`: the server scores the teacher's own tokens, the
    alignment stays here; one SGD step equals the local teacher's."""
    uld = dict(use_uld_loss=True, uld_use_hybrid_loss=True)
    local, _ = sgd_delta(tiny_cross_pair, tmp_path, "local", 2, 2, 1, **uld)
    remote, _ = sgd_delta(tiny_cross_pair, tmp_path, "remote", 2, 2, 1, teacher_server_url=cross_server, **uld)
    error = relative_l2(remote, local)
    print(f"axolotl train, hybrid ULD, one SGD step: relative L2 remote vs local {error:.2e}")
    assert error < 1e-5


@pytest.mark.e2e
def test_two_training_processes_share_the_teacher_server(server, tiny_pair, tmp_path):
    """2 processes x (micro batch 2, accumulation 2) against one server: the SGD step equals
    one process (8, 1) with the local teacher."""
    local, _ = sgd_delta(tiny_pair, tmp_path, "local", 8, 1, 1)
    before = requests.get(server + "/health", timeout=10).json()["served_requests"]
    remote, _ = sgd_delta(tiny_pair, tmp_path, "remote", 2, 2, 2, teacher_server_url=server)
    assert requests.get(server + "/health", timeout=10).json()["served_requests"] - before == 4
    error = relative_l2(remote, local)
    print(f"axolotl train, 2 processes x (2, 2) remote vs (8, 1) local: relative L2 {error:.2e}")
    assert error < 1e-5


@pytest.mark.e2e
def test_axolotl_train_stops_before_loading_when_the_server_is_down(tiny_pair, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = gold_config(tiny_pair, tmp_path, teacher_server_url=url, teacher_server_retries=1)
    with pytest.raises(AssertionError) as err:
        run_train(cfg, tmp_path)
    message = str(err.value)
    assert url in message and "python -m axolotl_gold.models.teacher_server" in message
    assert "pre_model_load" in (tmp_path / "log.txt").read_text()  # before the student loads


def test_console_script_starts_the_server_cli():
    """``axolotl-gold-teacher-server`` (pyproject's [project.scripts]) is the server's CLI."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "axolotl-gold-teacher-server")
    run = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--model" in run.stdout and "--max-batch-rows" in run.stdout
