"""`teacher_servers` with `teacher_server_mode: prompt_logprobs` against two real vLLM
OpenAI-compatible servers (CPU build) on loopback, serving two different tiny teachers of one
tokenizer (the tiny teacher, and one of another hidden size and depth): a mixed batch routed
per row scores as each row alone with its own server (loss sum and student gradient), each
server is asked for its own rows only; `axolotl train` runs with a dataset column."""

import contextlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from axolotl_run import gold_config, log_history, run_train  # noqa: E402
from grads import loss_and_grad  # noqa: E402
from server_process import free_port, served  # noqa: E402

NAMES = ["a", "b", "b", "a", "a", "b"]  # the teacher of each test row
TOP_K = 5


@pytest.fixture(scope="module")
def other_teacher(tiny_pair, tmp_path_factory):
    """The tiny teacher's tokenizer and vocabulary; hidden size 192 (not 128), 2 layers."""
    from transformers import AutoTokenizer

    from axolotl_gold.demo.models import make_config, new_model, save_model

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    path = str(tmp_path_factory.mktemp("teacher_b") / "teacher_b")
    save_model(new_model(make_config(tok, hidden_size=192, num_hidden_layers=2, intermediate_size=384), seed=5), tok, path)
    return path


@pytest.fixture(scope="module")
def vllm_pair(tiny_pair, other_teacher, tmp_path_factory):
    """``{"a": (url, log), "b": (url, log)}``: one vLLM OpenAI server per teacher, started side by
    side, shared by the module's tests."""
    folder = tmp_path_factory.mktemp("vllm_teachers")
    cpus = sorted(os.sched_getaffinity(0))

    def start(name, model, cpu):
        port, log = free_port(), folder / f"server_{name}.log"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--max-logprobs", "20", "--enforce-eager"]
        # each worker on its own core (vLLM's automatic binding puts both on the same one)
        return name, log, served(cmd, log, "/v1/models", 300, port, PYTHONUNBUFFERED="1",
                                 VLLM_CPU_OMP_THREADS_BIND=str(cpu))

    with contextlib.ExitStack() as stack:
        specs = [start("a", tiny_pair["teacher"], cpus[0]), start("b", other_teacher, cpus[-1])]
        with ThreadPoolExecutor(2) as pool:
            futures = [(name, log, pool.submit(stack.enter_context, cm)) for name, log, cm in specs]
        yield {name: (future.result(), log) for name, log, future in futures}


def scored(log: Path) -> int:
    return log.read_text().count("POST /v1/completions")


def _rows(pair, tok):
    from axolotl_gold.data.batching import Rollout

    rows = []
    for line, name in zip(open(pair["train"]).read().splitlines(), NAMES):
        messages = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        rows.append(Rollout(
            prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"],
            completion_ids=tok(messages[-1]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"],
            teacher=name,
        ))
    return rows


def test_mixed_batch_equals_each_row_with_its_own_server(vllm_pair, tiny_pair, other_teacher):
    """Two batches of rows of both teachers, routed: the loss sums and the student gradient of
    each row scored alone by its own server (relative 1e-4); each server received exactly its
    own rows' tokens, one request per batch; the rows scored by the other server differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_gold.assembly import build_objective
    from axolotl_gold.config.settings import GoldSettings
    from axolotl_gold.models.remote.prompt_logprobs import PromptLogprobsTeacher
    from axolotl_gold.models.remote.router import TeacherRouter, connect_teachers
    from axolotl_gold.scoring.loss import loss_sum, teacher_scoring_batch

    (url_a, log_a), (url_b, log_b) = vllm_pair["a"], vllm_pair["b"]
    settings = GoldSettings.from_cfg({
        "teacher_model": tiny_pair["teacher"], "sequence_len": 64, "max_completion_length": 12, "beta": 0.5,
        "teacher_servers": {"a": url_a, "b": url_b}, "teacher_models": {"b": other_teacher},
        "teacher_server_mode": "prompt_logprobs", "teacher_server_top_k": TOP_K,
    })
    router = connect_teachers(settings, torch.device("cpu"))
    assert isinstance(router, TeacherRouter)
    assert all(isinstance(t, PromptLogprobsTeacher) for t in router.teachers.values())
    assert {n: t.served_model for n, t in router.teachers.items()} == {"a": tiny_pair["teacher"], "b": other_teacher}

    sent = {name: [] for name in router.teachers}  # the prompts each server was asked about
    for name, client in router.teachers.items():
        def record(prompts, positions, top_k=None, _name=name, _ask=client.prompt_logprobs):
            sent[_name].append([list(p) for p in prompts])
            return _ask(prompts, positions, top_k)
        client.prompt_logprobs = record

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    objective = build_objective(settings, student, router, tok)
    rows = _rows(tiny_pair, tok)
    batches = [teacher_scoring_batch(rows[i: i + 3], tok.pad_token_id, objective) for i in (0, 3)]
    assert [b["teacher_names"] for b in batches] == [NAMES[:3], NAMES[3:]]

    def grad(score):
        return loss_and_grad(student, score)

    def routed():
        return sum(loss_sum(student, router, batch, objective, True)[0] for batch in batches)

    def each_row_alone(teachers):
        total = 0.0
        for row in rows:
            batch = teacher_scoring_batch([row], tok.pad_token_id, objective)
            batch.pop("teacher_names")
            total = total + loss_sum(student, teachers[row.teacher], batch, objective, True)[0]
        return total

    before = scored(log_a), scored(log_b)
    got, got_grad = grad(routed)
    # each server: one request per batch, holding exactly the tokens of its own rows, in order
    assert (scored(log_a) - before[0], scored(log_b) - before[1]) == (2, 2)
    for name in ("a", "b"):
        want = [[r.prompt_ids + r.completion_ids for r in rows[i: i + 3] if r.teacher == name] for i in (0, 3)]
        assert sent[name] == want, name

    want, want_grad = grad(lambda: each_row_alone(router.teachers))
    assert len(sent["a"]) == 2 + NAMES.count("a") and len(sent["b"]) == 2 + NAMES.count("b")
    error = float((got_grad - want_grad).norm() / want_grad.norm())
    print(f"two vLLM teacher servers: loss {got:.6f} vs {want:.6f}; relative L2 of the student gradient {error:.2e}")
    assert got == pytest.approx(want, rel=1e-4)
    assert error < 1e-4
    # the test can fail: each row scored by the other server is far off
    _, swapped = grad(lambda: each_row_alone({"a": router.teachers["b"], "b": router.teachers["a"]}))
    assert float((swapped - want_grad).norm() / want_grad.norm()) > 1e-2


@pytest.mark.e2e
def test_axolotl_train_with_two_vllm_teachers(vllm_pair, tiny_pair, other_teacher, tmp_path):
    """`axolotl train` (on-policy and off) with a dataset column choosing the vLLM teacher per
    row: finite losses; both servers scored rows, each at most once per micro-step, and a
    micro-step held rows of both."""
    (url_a, log_a), (url_b, log_b) = vllm_pair["a"], vllm_pair["b"]
    lines = open(tiny_pair["train"]).read().splitlines()
    data = tmp_path / "train_teachers.jsonl"
    data.write_text("".join(json.dumps({**json.loads(l), "source": "ab"[i % 2]}) + "\n" for i, l in enumerate(lines)))
    datasets = [{**d, "path": str(data)} for d in gold_config(tiny_pair, tmp_path)["datasets"]]
    before = scored(log_a), scored(log_b)
    cfg = gold_config(tiny_pair, tmp_path, datasets=datasets, teacher_server_mode="prompt_logprobs",
                      teacher_servers={"a": url_a, "b": url_b}, teacher_models={"b": other_teacher},
                      teacher_column="source", lmbda=0.5, num_generations=1, micro_batch_size=4,
                      gradient_accumulation_steps=1, max_steps=2, save_steps=2)
    out = run_train(cfg, tmp_path)
    losses = [h["loss"] for h in log_history(out, 2) if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(l) and l > 0 for l in losses)
    # the checks at start (before loading, then at assembly) ask each server twice; then each
    # of the 2 micro-steps (4 rows) asks each server whose rows it holds, once: more than 2
    # requests in all means a micro-step held rows of both teachers
    asked = [scored(log_a) - before[0] - 2, scored(log_b) - before[1] - 2]
    print(f"axolotl train, two vLLM teachers: scoring requests a={asked[0]} b={asked[1]}")
    assert min(asked) >= 1 and 2 < sum(asked) <= 4
