"""`axolotl train` runs: on-policy evaluation, the completions log, and off-policy
repeats scored once (tiny local models, CPU subprocesses)."""

import json
import math

import pytest

from axolotl_run import gold_config, log_history, relative_l2, run_train, sgd_delta

pytestmark = pytest.mark.e2e


def _write_eval(pair, path, prompt_only=False):
    """The held-out rows; every other completion cut short, so batch means and the
    per-token mean differ (all demo completions have the same length)."""
    lines = []
    for i, line in enumerate(open(pair["eval"]).read().splitlines()[:10]):
        messages = json.loads(line)["messages"]
        if prompt_only:
            messages = messages[:-1]
        elif i % 2:
            messages[-1]["content"] = messages[-1]["content"][:1]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _eval_config(pair, tmp_path, eval_file, **overrides):
    return gold_config(
        pair, tmp_path, lmbda=1.0, eval_strategy="steps", eval_steps=3,
        test_datasets=[{"path": eval_file, "ds_type": "json", "type": "chat_template", "split": "train"}],
        **overrides,
    )


def _eval_logs(out):
    """Step -> eval metrics (Axolotl evaluates at step 0 too)."""
    return {h["step"]: h for h in log_history(out, 3) if any(k.startswith("eval_") for k in h)}


def test_on_policy_eval_per_token_and_completions_log(tiny_pair, tmp_path):
    eval_file = _write_eval(tiny_pair, tmp_path / "eval.jsonl")
    # on-policy eval (default), eval batches of 3 over 10 rows, completions every 2 steps
    cfg = _eval_config(
        tiny_pair, tmp_path / "a", eval_file, eval_batch_size=3, gold_log_completions_steps=2
    )
    a = run_train(cfg, tmp_path / "a")
    logs_a = _eval_logs(a)
    assert sorted(logs_a) == [0, 3]
    ea = logs_a[3]
    assert math.isfinite(ea["eval_loss"]) and ea["eval_loss"] > 0
    assert ea["eval_loss"] == ea["eval_onpolicy_loss"] != ea["eval_offpolicy_loss"]
    assert 0 < ea["eval_completion_length"] <= 12

    # off-policy eval with batches of 1: the same model (eval does not change training),
    # so the per-token off-policy loss must not depend on the eval batch size
    cfg = _eval_config(
        tiny_pair, tmp_path / "c", eval_file, eval_batch_size=1, gold_eval_on_policy=False
    )
    c = run_train(cfg, tmp_path / "c")
    logs_c = _eval_logs(c)
    for step in (0, 3):
        ec = logs_c[step]
        assert "eval_onpolicy_loss" not in ec
        assert ec["eval_loss"] == pytest.approx(ec["eval_offpolicy_loss"])
        assert ec["eval_loss"] == pytest.approx(logs_a[step]["eval_offpolicy_loss"], rel=1e-5)

    records = [json.loads(l) for l in (a / "gold_completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2] * 4  # the window of step 2: micro batch 2 x 2
    for r in records:
        assert set(r) == {"step", "on_policy", "prompt", "completion", "length", "loss", "reverse_kl"}
        assert r["on_policy"] is True and "encode" in r["prompt"]
        assert r["length"] > 0 and r["completion"]
        assert r["loss"] > 0 and r["reverse_kl"] > 0
    assert not (c / "gold_completions.jsonl").exists()  # off by default


def test_prompt_only_eval_reports_the_on_policy_loss(tiny_pair, tmp_path):
    eval_file = _write_eval(tiny_pair, tmp_path / "eval.jsonl", prompt_only=True)
    out = run_train(_eval_config(tiny_pair, tmp_path, eval_file), tmp_path)
    for e in _eval_logs(out).values():
        assert math.isfinite(e["eval_loss"]) and e["eval_loss"] > 0  # was 0.0: nothing scored
        assert "eval_offpolicy_loss" not in e


def test_offpolicy_repeats_give_the_repeated_gradient(tiny_pair, tmp_path):
    """Off-policy windows of 2 prompts x 2 repeats (each scored once, weight 2) against
    the same 2 prompts once each: the per-token mean, hence one SGD step, is equal."""
    ref, w_ref = sgd_delta(tiny_pair, tmp_path, "once", 1, 2, 1)
    rep, w_rep = sgd_delta(tiny_pair, tmp_path, "twice", 2, 2, 1, num_generations=2)
    assert w_rep[0]["prompts_sha1"] != w_ref[0]["prompts_sha1"]  # repeats listed twice
    assert w_rep[0]["scored_tokens"] == 2 * w_ref[0]["scored_tokens"]  # the repeated count
    rel = relative_l2(rep, ref)
    print(f"repeats weighted vs once: relative L2 difference = {rel:.2e}")
    assert rel < 1e-5, rel
