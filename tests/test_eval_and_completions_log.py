"""Evaluation totals and the completions table (no trainer, no trackers installed)."""

import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_gold.data.batching import Rollout
from axolotl_gold.trainer.completions_log import (
    append_jsonl,
    completion_records,
    log_to_trackers,
    row_scores,
)
from axolotl_gold.trainer.evaluation import EvalTotals, sample_eval_rows
from axolotl_gold.losses.jsd import generalized_jsd_token_loss
from axolotl_gold.scoring.objectives import JsdObjective


def test_eval_loss_is_per_token_not_a_mean_of_batch_means():
    totals = EvalTotals()
    for loss_sum, tokens in ((1.0, 1), (9.0, 3)):  # batch means 1.0 and 3.0
        totals.onpolicy_sum += loss_sum
        totals.onpolicy_units += tokens
    totals.offpolicy_sum, totals.offpolicy_units = 2.0, 4
    totals.sampled_tokens, totals.sampled_rows = 4, 2
    m = totals.metrics("eval", on_policy=True)
    assert m["eval_loss"] == m["eval_onpolicy_loss"] == 10.0 / 4
    assert m["eval_offpolicy_loss"] == 0.5 and m["eval_completion_length"] == 2
    assert totals.metrics("test", on_policy=False)["test_loss"] == 0.5


def test_nothing_scored_reports_no_loss():
    # prompt-only rows: no off-policy tokens; an off-policy eval has no loss to report
    totals = EvalTotals(onpolicy_sum=3.0, onpolicy_units=2.0, sampled_rows=1, sampled_tokens=2)
    assert "eval_offpolicy_loss" not in totals.metrics("eval", True)
    assert "eval_loss" not in totals.metrics("eval", on_policy=False)


class SeededEngine:
    calls = 0

    def generate(self, prompts, seed):
        self.calls += 1
        rng = torch.Generator().manual_seed(seed % 2**31)
        return [torch.randint(3, 9, (4,), generator=rng).tolist() for _ in prompts]


def test_eval_sampling_is_one_call_and_deterministic():
    rows = [Rollout(prompt_ids=[1, 2], completion_ids=[]) for _ in range(3)]
    engine = SeededEngine()
    a = sample_eval_rows(rows, engine, seed=7, batch_index=2, rank=0)
    b = sample_eval_rows(rows, engine, seed=7, batch_index=2, rank=0)
    c = sample_eval_rows(rows, engine, seed=7, batch_index=3, rank=0)
    assert engine.calls == 3 and [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    assert rows[0].completion_ids == []  # inputs untouched


@pytest.mark.parametrize("fused", [True, False])
def test_row_scores_reverse_kl_matches_a_plain_reference(tiny_pair, fused):
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"], dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"], dtype=torch.float64)
    rows = [
        Rollout(prompt_ids=tok("encode: abc")["input_ids"], completion_ids=tok("xyz")["input_ids"]),
        Rollout(prompt_ids=tok("encode: hello there")["input_ids"], completion_ids=tok("q")["input_ids"]),
    ]
    objective = JsdObjective(beta=0.5, temperature=1.0)
    scores = row_scores(student, teacher, rows, objective, tok.pad_token_id, fused)
    for row, score in zip(rows, scores):
        ids = torch.tensor([row.prompt_ids + row.completion_ids])
        n, c = len(row.prompt_ids), len(row.completion_ids)
        with torch.no_grad():
            s = student(ids).logits[0, n - 1 : n - 1 + c]
            t = teacher(ids).logits[0, n - 1 : n - 1 + c]
        want_kl = generalized_jsd_token_loss(s, t, beta=1.0).mean().item()
        want_loss = generalized_jsd_token_loss(s, t, beta=0.5).mean().item()
        assert score["reverse_kl"] == pytest.approx(want_kl, rel=1e-6)
        assert score["loss"] == pytest.approx(want_loss, rel=1e-6)


def test_records_jsonl_and_trackers(tmp_path, monkeypatch):
    rows = [Rollout(prompt_ids=[1, 2], completion_ids=[3, 4, 5])]
    records = completion_records(
        4, rows, [True], [{"loss": 0.5, "reverse_kl": 0.25}], lambda ids: " ".join(map(str, ids))
    )
    path = tmp_path / "out" / "gold_completions.jsonl"
    append_jsonl(str(path), records)
    append_jsonl(str(path), records)
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert lines == records * 2
    assert lines[0] == {"step": 4, "on_policy": True, "prompt": "1 2", "completion": "3 4 5",
                        "length": 3, "loss": 0.5, "reverse_kl": 0.25}

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert not log_to_trackers(records, ["wandb"])  # not imported by anyone: not in use
    assert "wandb" not in sys.modules  # and not imported here
    assert not log_to_trackers(records, ["tensorboard"])  # no callback has started a writer


def _records():
    rows = [Rollout(prompt_ids=[1, 2], completion_ids=[3, 4, 5])]
    return completion_records(4, rows, [True], [{"loss": 0.5, "reverse_kl": None}], lambda ids: "a|b\nc")


def test_completions_table_to_a_real_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(dir=str(tmp_path), project="gold-test")
    try:
        assert log_to_trackers(_records(), ["wandb"], step=4) == ["wandb"]
        assert log_to_trackers(_records(), ["tensorboard"], step=4) == []
    finally:
        run.finish()


def test_completions_table_to_tensorboard_through_hf_callback(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(tmp_path)  # what on_train_begin sets from the training args
    callback._init_summary_writer(None)
    assert log_to_trackers(_records(), ["tensorboard"], [callback], step=4) == ["tensorboard"]
    callback.tb_writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    (event,) = events.Tensors("gold/completions/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 4
    assert text.splitlines()[0].startswith("| step | on_policy | prompt | completion")
    assert "a\\|b\\nc" in text  # cells escaped: one table row per record