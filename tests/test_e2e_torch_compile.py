"""Axolotl's ``torch_compile: true`` with the GOLD plugin, through ``axolotl train`` (CPU).

HF's Trainer hands ``torch_compile`` to Accelerate, whose ``prepare`` wraps the student in
``torch.compile``: ``compute_loss`` (the hidden-state forward, ``scoring/forward.py``) and
the backward run compiled, while the engines, the completions log and saving keep the plain
model. One run exercises all of them: mixed on- and off-policy windows (so the scoring width
changes and dynamo recompiles with dynamic shapes), on-policy evaluation, the completions
log, a checkpoint and the final save. Inductor writes its cache under a folder of the test's
own: on the CPU nothing else of ours compiles (the fused loss compiles on CUDA only, the
decode step with ``gold_rollout_compile`` on CUDA only), so its entries show the student
went through the compiler.
"""

import math

import pytest
import torch

from axolotl_run import gold_config, log_history, run_train, weights, windows

pytestmark = pytest.mark.e2e


def test_torch_compile_trains_evaluates_and_saves_the_student(tiny_pair, tmp_path, monkeypatch):
    cache = tmp_path / "inductor_cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # run_train passes the environment on
    # the scoring batches' widths rounded up to multiples of 64 (fewer shapes to compile)
    cfg = gold_config(
        tiny_pair, tmp_path, torch_compile=True, gold_scoring_width_multiple=64, lmbda=0.5,
        val_set_size=0.25, eval_strategy="steps", eval_steps=3, gold_log_completions_steps=3,
    )
    out = run_train(cfg, tmp_path, timeout=900)

    # the student was compiled (inductor's generated code for its graphs)
    assert [p for p in cache.rglob("*.py") if p.is_file()], f"nothing compiled under {cache}"
    history = log_history(out, 3)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    eval_losses = [h["eval_onpolicy_loss"] for h in history if "eval_onpolicy_loss" in h]
    assert eval_losses and all(math.isfinite(l) and l > 0 for l in eval_losses)
    # one engine call per window with an on-policy slice (the plain model samples)
    records = windows(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]
    assert all(w % 64 == 0 for r in records for w in r["scoring_widths"]), records
    assert (out / "gold_completions.jsonl").read_text().strip()

    # saved under the model's own names (no ``_orig_mod.`` prefix), trained, and reloadable
    before, after = weights(tiny_pair["student"]), weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    sample = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert sample.shape[0] == 1 and 3 < sample.shape[1] <= 7
