"""End-to-end `axolotl train` runs on tiny local models (CPU, subprocesses).

Each run takes ~30-40 s, mostly imports; they are few and marked `e2e`.
"""

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch

from axolotl_run import gold_config, log_history, relative_l2, run_train, sgd_delta, windows
from axolotl_run import weights as _weights

pytestmark = pytest.mark.e2e


def _sha(folder) -> str:
    h = hashlib.sha1()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _train_losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_full_finetune_on_policy(tiny_pair, tmp_path):
    teacher_sha = _sha(tiny_pair["teacher"])
    cfg = gold_config(
        tiny_pair, tmp_path, lmbda=1.0, val_set_size=0.25, eval_strategy="steps", eval_steps=3
    )
    out = run_train(cfg, tmp_path)
    history = log_history(out, 3)
    # evaluation: the divergence on the student's samples for the held-out prompts (on-policy)
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert eval_losses and all(math.isfinite(l) and l > 0 for l in eval_losses)
    losses = _train_losses(history)
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    assert all(h["gold/on_policy_fraction"] == 1 for h in history if "loss" in h)
    assert all(h["gold/time_generation_s"] > 0 and h["gold/time_teacher_s"] > 0 and h["gold/time_student_s"] > 0
               for h in history if "loss" in h)
    # one generation call per optimizer step, for the whole window
    records = windows(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["engine_calls"] for r in records] == [1, 1, 1]
    # the saved output is the student (loads, same tensors as the student, changed)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    before, after = _weights(tiny_pair["student"]), _weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert _sha(tiny_pair["teacher"]) == teacher_sha  # teacher untouched


def test_lora_mixed_policy_seq_kd(tiny_pair, tmp_path):
    cfg = gold_config(
        tiny_pair, tmp_path, lmbda=0.5, max_steps=4, save_steps=4, seq_kd=True,
        adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
        learning_rate=1e-2,
        gold_generation_engine="static",  # the static-cache engine, eager on the CPU
        gold_generation_rows=2,  # 2 rows at once: a window's other prompts start in refilled slots
        gold_rollout_fuse_projections=True,  # the LoRA layers' groups (fused_projections.py) in the decode steps
        # Axolotl's fused LoRA kernels are CUDA-only
        lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
    )
    out = run_train(cfg, tmp_path)
    assert (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()  # the adapter, not a merged model
    records = windows(out)
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]
    # seq_kd: off-policy slices are sampled by the teacher, once per window that has any
    assert records[-1]["teacher_engine_calls_total"] == sum(not all(r["on_policy"]) for r in records)
    # each on-policy slice is 2 prompts: all but the first 2 of a window start in a refilled slot
    assert records[-1]["engine_refills"] == sum(max(0, 2 * sum(r["on_policy"]) - 2) for r in records) > 0
    assert all(math.isfinite(l) for l in _train_losses(log_history(out, 4)))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    model = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at zero)


def test_cross_tokenizer_uld(tiny_cross_pair, tmp_path):
    """A student and a teacher with different tokenizers (char-level vs BPE)."""
    cfg = gold_config(tiny_cross_pair, tmp_path, lmbda=0.5, use_uld_loss=True, max_steps=3)
    out = run_train(cfg, tmp_path)
    losses = _train_losses(log_history(out, 3))
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    records = windows(out)
    assert all(r["scored_tokens"] > 0 for r in records)  # aligned positions of the window
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]


@pytest.mark.parametrize("loss", ["jsd", "uld"])
def test_gradients_do_not_depend_on_the_window_split(request, tmp_path, loss):
    """One optimizer step with (micro batch 8, accumulation 1), (2, 4) and 2 processes x
    (2, 2) (DDP over gloo) gives the same gradient: the loss is normalized once per window."""
    pair = request.getfixturevalue("tiny_pair" if loss == "jsd" else "tiny_cross_pair")
    extra = {"use_uld_loss": True, "uld_use_hybrid_loss": True} if loss == "uld" else {}
    ref, w_ref = sgd_delta(pair, tmp_path, "mb8", 8, 1, 1, **extra)
    acc, w_acc = sgd_delta(pair, tmp_path, "mb2ga4", 2, 4, 1, **extra)
    ddp, _ = sgd_delta(pair, tmp_path, "2proc", 2, 2, 2, **extra)
    assert w_ref[0]["scored_tokens"] == w_acc[0]["scored_tokens"]
    for name, other in (("(2,4)", acc), ("2x(2,2) DDP", ddp)):
        rel = relative_l2(other, ref)
        print(f"{loss} {name}: relative L2 difference to (8,1) = {rel:.2e}")
        assert rel < 1e-4, rel


def test_resume_replays_prompts_and_draws(tiny_pair, tmp_path):
    cfg = gold_config(tiny_pair, tmp_path / "full", lmbda=0.5, max_steps=4, save_steps=2)
    full = run_train(cfg, tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    resumed_out = resumed_dir / "out"
    resumed_out.mkdir(parents=True)
    shutil.copytree(full / "checkpoint-2", resumed_out / "checkpoint-2")
    cfg = gold_config(
        tiny_pair, resumed_dir, lmbda=0.5, max_steps=4, save_steps=2,
        resume_from_checkpoint=str(resumed_out / "checkpoint-2"),
    )
    resumed = run_train(cfg, resumed_dir)
    uninterrupted = {r["step"]: r for r in windows(full)}
    replayed = windows(resumed)
    assert [r["step"] for r in replayed] == [2, 3]
    for r in replayed:
        assert r["on_policy"] == uninterrupted[r["step"]]["on_policy"]
        assert r["prompts_sha1"] == uninterrupted[r["step"]]["prompts_sha1"]
        assert r["scored_tokens"] == uninterrupted[r["step"]]["scored_tokens"]
    a, b = _weights(full), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
