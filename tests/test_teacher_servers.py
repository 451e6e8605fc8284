"""Several teacher servers, a dataset column choosing the teacher per row (`teacher_servers`):
two real servers with different tiny teachers on loopback, a mixed batch's loss and gradient
equal to each row scored by its own teacher loaded locally, prefetch, errors, `axolotl train`."""

from __future__ import annotations

import json

import pytest
import requests
import torch

from axolotl_gold.config.errors import GoldConfigError
from grads import loss_and_grad
from axolotl_gold.models.remote.router import TeacherRouter, check_teacher_servers, connect_teachers
from axolotl_gold.models.remote.teacher import TeacherServerError

from test_teacher_server import _rows, free_port, server, start_server, stop  # noqa: F401 (fixture)
from axolotl_run import gold_config, relative_l2, run_train, sgd_delta

NAMES = ["a", "b", "b", "a", "a", "b"]  # the teacher of each test row


@pytest.fixture(scope="module")
def other_teacher(tiny_pair, tmp_path_factory):
    """The tiny teacher's architecture and tokenizer with other weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float32)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("other") / "teacher_b")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_pair["teacher"]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server_b(other_teacher, tmp_path_factory):
    proc, url = start_server(other_teacher, tmp_path_factory.mktemp("ts_b") / "server.log")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def wide_teacher(tiny_pair, tmp_path_factory):
    """A teacher of the tiny teacher's tokenizer and vocabulary with another hidden size (192,
    not 128), depth and output head."""
    from transformers import AutoTokenizer

    from axolotl_gold.demo.models import make_config, new_model, save_model

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    model = new_model(make_config(tok, hidden_size=192, num_hidden_layers=2, intermediate_size=384), seed=5)
    path = str(tmp_path_factory.mktemp("wide") / "teacher_wide")
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="module")
def server_wide(wide_teacher, tmp_path_factory):
    proc, url = start_server(wide_teacher, tmp_path_factory.mktemp("ts_wide") / "server.log")
    yield url
    stop(proc)


def settings_two(tiny_pair, other_teacher, url_a, url_b, **extra):
    from axolotl_gold.config.settings import GoldSettings

    cfg = {"teacher_model": tiny_pair["teacher"], "sequence_len": 64, "max_completion_length": 12,
           "teacher_servers": {"a": url_a, "b": url_b}, "teacher_models": {"b": other_teacher}, **extra}
    return GoldSettings.from_cfg(cfg)


def _named_rows(tiny_pair, tok):
    rows = _rows(tiny_pair, tok, len(NAMES))
    for row, name in zip(rows, NAMES):
        row.teacher = name
    return rows


# --------------------------------------------------------------------------- loss and gradient


@pytest.mark.parametrize("fused", [True, False])
def test_mixed_batch_equals_each_row_scored_by_its_local_teacher(tiny_pair, other_teacher, server, server_b, fused):
    """A window of rows of two teachers, scored through two servers, gives the loss sums and the
    student gradient of each row scored alone by its own teacher loaded locally (float32,
    relative L2 < 1e-5); the same rows with the teachers swapped do not."""
    _mixed_batch_equals_local(tiny_pair, other_teacher, server, server_b, fused)


@pytest.mark.parametrize("fused", [True, False])
def test_teachers_of_different_hidden_sizes(tiny_pair, wide_teacher, server, server_wide, fused):
    """Teacher b of another hidden size (192; a's is 128), depth and head, same vocabulary:
    the mixed batch still gives each row's loss and gradient with its own teacher local."""
    infos = check_teacher_servers(settings_two(tiny_pair, wide_teacher, server, server_wide))
    assert {n: i["hidden_size"] for n, i in infos.items()} == {"a": 128, "b": 192}  # the checks before loading
    _mixed_batch_equals_local(tiny_pair, wide_teacher, server, server_wide, fused, hidden=(128, 192))


def _mixed_batch_equals_local(tiny_pair, path_b, url_a, url_b, fused, hidden=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_gold.assembly import build_objective
    from axolotl_gold.scoring.loss import loss_sum, teacher_scoring_batch

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    local = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
             for name, path in (("a", tiny_pair["teacher"]), ("b", path_b))}
    settings = settings_two(tiny_pair, path_b, url_a, url_b, gold_fused_loss=fused, beta=0.5)
    router = connect_teachers(settings, torch.device("cpu"))
    assert isinstance(router, TeacherRouter) and set(router.teachers) == {"a", "b"}
    # each client holds its own teacher's head
    assert torch.equal(router.teachers["b"].lm_head.weight, local["b"].lm_head.weight)
    heads = [router.teachers[n].lm_head.weight for n in "ab"]
    assert heads[0].shape != heads[1].shape or not torch.equal(*heads)
    if hidden is not None:
        assert tuple(h.shape[1] for h in heads) == hidden
    objective = build_objective(settings, student, router, tok)
    rows = _named_rows(tiny_pair, tok)
    batches = [teacher_scoring_batch(rows[i: i + 3], tok.pad_token_id, objective) for i in (0, 3)]
    assert batches[0]["teacher_names"] == NAMES[:3]
    total = sum(objective.count(b) for b in batches)

    def grad(score):
        student.zero_grad()
        sums = score()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]), sums

    def served(teacher):
        sums = []
        for batch in batches:
            value, _ = loss_sum(student, teacher, batch, objective, fused)
            (value / total).backward()
            sums.append(float(value))
        return sums

    def each_row_alone(teachers):
        sums = [0.0, 0.0]
        for i, row in enumerate(rows):
            batch = teacher_scoring_batch([row], tok.pad_token_id, objective)
            batch.pop("teacher_names")
            value, _ = loss_sum(student, teachers[row.teacher], batch, objective, fused)
            (value / total).backward()
            sums[i // 3] += float(value)
        return sums

    want, want_sums = grad(lambda: each_row_alone(local))
    asked = {n: t.requests for n, t in router.teachers.items()}
    got, got_sums = grad(lambda: served(router))
    # one request per teacher per batch (each batch has rows of both)
    assert {n: t.requests - asked[n] for n, t in router.teachers.items()} == {"a": 2, "b": 2}
    error = float((got - want).norm() / want.norm())
    print(f"two teacher servers, fused={fused}: relative L2 of the student gradient {error:.2e}")
    assert error < 1e-5
    assert got_sums == pytest.approx(want_sums, rel=1e-5)
    # the test can fail: each row scored by the other teacher is far off
    swapped, _ = grad(lambda: each_row_alone({"a": local["b"], "b": local["a"]}))
    assert float((swapped - want).norm() / want.norm()) > 1e-2


class _LocalTopK:
    """A stand-in for a ``prompt_logprobs`` client: a local model's top-8 log-probs."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def completion_states(self, batch, use_head_bypass=True):
        from axolotl_gold.scoring.forward import completion_states
        from axolotl_gold.scoring.topk import TopKStates

        with torch.no_grad():
            top = completion_states(self.model, batch, use_head_bypass=False).values.log_softmax(-1).topk(8, -1)
        return TopKStates(top.indices, top.values)


def test_top_k_teachers_per_row_with_repeats(tiny_pair, other_teacher):
    """``prompt_logprobs`` answers routed per row (with ``row_weights``): the loss and gradient
    of each row scored alone by its teacher, times its weight."""
    from transformers import AutoModelForCausalLM

    from axolotl_gold.data.batching import build_scoring_batch
    from axolotl_gold.scoring.loss import loss_sum
    from axolotl_gold.scoring.topk import TopKTailObjective

    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float32)
    local = {"a": _LocalTopK(AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"]).eval()),
             "b": _LocalTopK(AutoModelForCausalLM.from_pretrained(other_teacher).eval())}
    router = TeacherRouter(local)
    objective = TopKTailObjective(beta=0.5, temperature=1.0, chunk_size=3)
    prompts, completions = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[14, 15, 16], [17, 18, 19, 20], [21]]
    names, weights = ["a", "b", "a"], [1, 3, 2]

    def grad(score):
        return loss_and_grad(student, score)

    def routed():
        batch = build_scoring_batch(prompts, completions, pad_id=0)
        batch.update(teacher_names=names, row_weights=torch.tensor(weights))
        return loss_sum(student, router, batch, objective, True)[0]

    def alone(teachers):
        return sum(w * loss_sum(student, teachers[n], build_scoring_batch([p], [c], pad_id=0), objective, True)[0]
                   for p, c, n, w in zip(prompts, completions, names, weights))

    got, got_grad = grad(routed)
    want, want_grad = grad(lambda: alone(local))
    assert got == pytest.approx(want, rel=1e-5)
    assert float((got_grad - want_grad).norm() / want_grad.norm()) < 1e-5
    _, swapped = grad(lambda: alone({"a": local["b"], "b": local["a"]}))
    assert float((swapped - want_grad).norm() / want_grad.norm()) > 1e-2


def test_prefetch_asks_every_server_ahead(tiny_pair, other_teacher, server, server_b):
    from transformers import AutoTokenizer

    from axolotl_gold.scoring.forward import completion_states
    from axolotl_gold.scoring.loss import scoring_batch
    from axolotl_gold.scoring.routing import RoutedStates

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    router = connect_teachers(settings_two(tiny_pair, other_teacher, server, server_b), torch.device("cpu"))
    rows = _named_rows(tiny_pair, tok)
    batches = []
    for i in (0, 3):
        batch = scoring_batch(rows[i: i + 3], tok.pad_token_id)
        batch["teacher_names"] = NAMES[i: i + 3]
        batches.append(batch)
    direct = [completion_states(router, b, True) for b in batches]
    before = {n: t.requests for n, t in router.teachers.items()}
    router.prefetch(batches)
    got = [completion_states(router, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}, True)
           for b in batches]
    assert {n: t.requests - before[n] for n, t in router.teachers.items()} == {"a": 2, "b": 2}
    assert all(t._prefetch.taken == 2 for t in router.teachers.values())  # answered from the prefetch
    for want, have in zip(direct, got):
        assert isinstance(have, RoutedStates)
        assert [rows for rows, _ in have.groups] == [rows for rows, _ in want.groups]
        for (_, w), (_, h) in zip(want.groups, have.groups):
            assert torch.equal(w.values, h.values)
    # a server that went away fails the micro-step that needs it, naming its key
    router.teachers["b"].url = f"http://127.0.0.1:{free_port()}"
    router.teachers["b"].retries, router.teachers["b"].backoff = 1, 0.0
    router.prefetch(batches)
    with pytest.raises(TeacherServerError, match="teacher_servers.b"):
        completion_states(router, batches[0], True)


def test_rows_without_a_known_teacher_are_refused(tiny_pair, other_teacher, server, server_b):
    from axolotl_gold.data.batching import build_scoring_batch

    router = connect_teachers(settings_two(tiny_pair, other_teacher, server, server_b), torch.device("cpu"))
    batch = build_scoring_batch([[5, 6], [7]], [[8], [9]], pad_id=0)
    for names, shown in ((["a", "c"], "'c'"), (None, "None")):
        batch.pop("teacher_names", None)
        if names is not None:
            batch["teacher_names"] = names
        with pytest.raises(GoldConfigError, match="teacher_servers") as err:
            router.completion_states(batch)
        assert shown in str(err.value) and "['a', 'b']" in str(err.value) and "`teacher`" in str(err.value)


# --------------------------------------------------------------------------- start checks


def test_start_checks_run_for_every_server(tiny_pair, other_teacher, server, server_b):
    infos = check_teacher_servers(settings_two(tiny_pair, other_teacher, server, server_b))
    assert {n: i["model"] for n, i in infos.items()} == {"a": tiny_pair["teacher"], "b": other_teacher}
    # server b serves teacher b, but b's head is read from teacher a's checkpoint
    wrong = settings_two(tiny_pair, other_teacher, server, server_b, teacher_models={})
    with pytest.raises(GoldConfigError, match="output head differs") as err:
        connect_teachers(wrong, torch.device("cpu"))
    assert "`teacher_servers.b: " in str(err.value) and "`teacher_model: " in str(err.value)
    # a server that is down is named by its key
    down = settings_two(tiny_pair, other_teacher, server, f"http://127.0.0.1:{free_port()}", teacher_server_retries=1)
    with pytest.raises(TeacherServerError, match="set `teacher_servers.b`"):
        check_teacher_servers(down)


# --------------------------------------------------------------------------- config and data


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"teacher_server_url": "http://h:1", "teacher_servers": {"a": "http://h:2"}}, "both set"),
        ({"teacher_servers": {}}, "must map each teacher"),
        ({"teacher_servers": {"a": "http://h:1", "b": "h:2"}}, r"`teacher_servers.b: h:2` must be an http"),
        ({"teacher_servers": {"a": "http://h:1"}, "teacher_models": {"c": "x"}}, r"`teacher_models` names \['c'\]"),
        ({"teacher_models": {"a": "x"}}, "`teacher_models` is set but `teacher_servers` is not"),
        ({"teacher_column": "source"}, "`teacher_column` is set but `teacher_servers` is not"),
        ({"teacher_servers": {"a": "http://h:1"}, "use_uld_loss": True}, "use_uld_loss"),
        ({"teacher_servers": {"a": "http://h:1"}, "seq_kd": True}, "`teacher_servers` is set, but `seq_kd"),
    ],
)
def test_config_errors_name_the_key(extra, message):
    from axolotl_gold.config.validation import validate_gold_settings

    with pytest.raises(GoldConfigError, match=message):
        validate_gold_settings({"teacher_model": "t", **extra})


def test_settings_per_teacher():
    from axolotl_gold.config.settings import GoldSettings

    s = GoldSettings.from_cfg({
        "teacher_model": "t", "teacher_model_revision": "r1", "teacher_servers": {"a": "http://h:1", "b": "http://h:2"},
        "teacher_models": {"b": "tb"}, "teacher_column": "source", "teacher_server_retries": 5,
    })
    assert s.teacher_server.enabled and s.teacher_server.column == "source"
    per = s.per_teacher()
    assert [(n, p.teacher.model, p.teacher.revision, p.teacher_server.url) for n, p in per.items()] == [
        ("a", "t", "r1", "http://h:1"), ("b", "tb", None, "http://h:2")]
    assert per["b"].teacher.tokenizer == "t" and per["b"].teacher_server.retries == 5
    assert (per["b"].teacher_server.url_key, per["b"].teacher_server.model_key) == ("teacher_servers.b", "teacher_models.b")
    assert per["a"].teacher_server.model_key == "teacher_model"


def test_dataset_rows_carry_their_teacher(tiny_pair):
    from transformers import AutoTokenizer

    from axolotl_gold.data.batching import GoldCollator
    from axolotl_gold.data.chat_template import GoldChatStrategy

    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    cfg = {"teacher_model": "t", "lmbda": 0.5, "max_completion_length": 8, "sequence_len": 24,
           "teacher_servers": {"math": "http://h:1", "code": "http://h:2"}, "teacher_column": "source"}
    strategy = GoldChatStrategy(tok, cfg, {})
    messages = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
    row = strategy.process_row({"messages": messages, "source": "code"}, 0)
    assert row["gold_teacher"] == "code"
    assert GoldCollator()([row])["gold_rollouts"][0].teacher == "code"
    for value in ("physics", None):
        with pytest.raises(GoldConfigError) as err:
            strategy.process_row({"messages": messages, "source": value}, 3)
        message = str(err.value)
        assert "row 3" in message and "`source`" in message and "['code', 'math']" in message
        assert (f"`{value}`" if value else "has no") in message
    # without teacher_servers no column is read
    plain = GoldChatStrategy(tok, {k: v for k, v in cfg.items() if k not in ("teacher_servers", "teacher_column")}, {})
    assert "gold_teacher" not in plain.process_row({"messages": messages}, 0)


def test_merged_repeats_keep_teachers_apart():
    from axolotl_gold.data.batching import Rollout, merge_repeats

    rows = [Rollout([1], [2], teacher="a"), Rollout([1], [2], teacher="a"), Rollout([1], [2], teacher="b")]
    assert merge_repeats(rows)[1] == [2, 1]


# --------------------------------------------------------------------------- axolotl train


def _dataset(tiny_pair, tmp_path, names) -> str:
    lines = open(tiny_pair["train"]).read().splitlines()
    path = tmp_path / "train_teachers.jsonl"
    path.write_text("".join(json.dumps({**json.loads(l), "source": names[i % len(names)]}) + "\n"
                            for i, l in enumerate(lines)))
    return str(path)


@pytest.mark.e2e
def test_axolotl_train_with_two_teacher_servers(tiny_pair, other_teacher, server, server_b, tmp_path):
    """`axolotl train` with two servers and a dataset column: rows of one teacher only give the
    SGD step of that teacher loaded locally; a mixed dataset trains with both servers asked."""
    def served(url):
        return requests.get(url + "/health", timeout=10).json()["served_requests"]

    two = dict(teacher_servers={"a": server, "b": server_b}, teacher_models={"b": other_teacher},
               teacher_column="source")
    only_b = [{**d, "path": _dataset(tiny_pair, tmp_path, ["b"])} for d in gold_config(tiny_pair, tmp_path)["datasets"]]
    local, _ = sgd_delta(tiny_pair, tmp_path, "local_b", 2, 2, 1, teacher_model=other_teacher)
    before = served(server), served(server_b)
    remote, _ = sgd_delta(tiny_pair, tmp_path, "remote_b", 2, 2, 1, datasets=only_b, **two)
    assert (served(server) - before[0], served(server_b) - before[1]) == (0, 2)
    error = relative_l2(remote, local)
    print(f"axolotl train, rows of teacher b via two servers vs b local: relative L2 {error:.2e}")
    assert error < 1e-5

    mixed = [{**d, "path": _dataset(tiny_pair, tmp_path, ["a", "b"])} for d in gold_config(tiny_pair, tmp_path)["datasets"]]
    before = served(server), served(server_b)
    # one rollout per prompt: a micro-batch's two rows may have two teachers
    # with the evaluation and the completions log scored through the servers too
    cfg = gold_config(tiny_pair, tmp_path / "mixed", datasets=mixed, max_steps=2, save_steps=2,
                      num_generations=1, val_set_size=0.1, eval_steps=2, gold_log_completions_steps=1, **two)
    out = run_train(cfg, tmp_path / "mixed")
    assert (out / "model.safetensors").exists()
    logged = [json.loads(line) for line in (out / "gold_completions.jsonl").read_text().splitlines()]
    assert len(logged) == 8 and all(r["loss"] is not None for r in logged)
    assert served(server) - before[0] > 0 and served(server_b) - before[1] > 0
