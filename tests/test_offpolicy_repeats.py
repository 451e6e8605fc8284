"""Off-policy repeats are scored once, weighted: same window sum, token count and
gradient as scoring every repeat (a plain loop over ``step.py`` on tiny models)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_gold.data.batching import Rollout, merge_repeats
from axolotl_gold.assembly import build_objective
from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.scoring.loss import loss_sum, scoring_batch
from axolotl_gold.trainer.window import prepare_window


class NoEngine:
    calls = 0

    def generate(self, prompts, seed):
        raise AssertionError("an off-policy window must not sample")


def _rows(pair, tok, n_prompts, repeats):
    lines = open(pair["train"]).read().splitlines()[:n_prompts]
    rows = []
    for line in lines:
        messages = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        completion = messages[-1]["content"] + tok.eos_token
        row = Rollout(
            prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"],
            completion_ids=tok(completion, add_special_tokens=False)["input_ids"],
            prompt_messages=messages[:-1],
            completion_text=completion,
        )
        rows += [Rollout(**vars(row)) for _ in range(repeats)]
    return rows


def _grad(student, teacher, objective, batches, total, fused):
    student.zero_grad()
    for batch in batches:
        loss, _ = loss_sum(student, teacher, batch, objective, fused)
        (loss / total).backward()
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "loss,fused,mbs,repeats",
    [("jsd", True, 4, 2), ("jsd", False, 4, 2), ("jsd", True, 3, 2), ("uld", True, 3, 2)],
)
def test_weighted_repeats_equal_repeated_rows(request, loss, fused, mbs, repeats):
    pair = request.getfixturevalue("tiny_pair" if loss == "jsd" else "tiny_cross_pair")
    tok = AutoTokenizer.from_pretrained(pair["student"])
    student = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float64)
    cfg = {"teacher_model": pair["teacher"], "sequence_len": 64, "use_uld_loss": loss == "uld",
           "uld_use_hybrid_loss": loss == "uld", "gold_fused_loss": fused, "max_completion_length": 12}
    settings = GoldSettings.from_cfg(cfg)
    objective = build_objective(settings, student, teacher, tok)
    rows = _rows(pair, tok, 6, repeats)  # mbs 3 splits a prompt's repeats across slices
    slices = [rows[i : i + mbs] for i in range(0, len(rows), mbs)]
    prepared = prepare_window(
        slices, draws=[False] * len(slices), step=0, seed=0, rank=0, pad_id=tok.pad_token_id,
        student_engine=NoEngine(), objective=objective,
    )
    scored_rows = sum(len(b["input_ids"]) for b in prepared.micro_batches)
    assert scored_rows < len(rows)  # each repeat is not scored again

    repeated = []
    for rows_ in slices:
        batch = scoring_batch(rows_, tok.pad_token_id)
        batch.update(objective.teacher_inputs(rows_) or {})
        repeated.append(batch)
    reference_tokens = sum(objective.count(b) for b in repeated)
    assert prepared.local_tokens == reference_tokens

    got = _grad(student, teacher, objective, prepared.micro_batches, prepared.local_tokens, fused)
    want = _grad(student, teacher, objective, repeated, reference_tokens, fused)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_merge_repeats_keeps_distinct_rows_apart():
    a = Rollout(prompt_ids=[1, 2], completion_ids=[3])
    b = Rollout(prompt_ids=[1, 2], completion_ids=[4])
    merged, counts = merge_repeats([a, Rollout(**vars(a)), b, Rollout(**vars(a))])
    assert counts == [2, 1, 1] and merged[1] == b
