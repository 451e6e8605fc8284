"""`axolotl train` + GOLD under FSDP2 on 2 GPUs (NCCL), against one GPU without FSDP.

Needs 2 CUDA GPUs, so CI (CPU only) skips it; on the device machine (`nvidia-h200-x2`):

    bash scripts/gpu_2gpu.sh tests                  # this file and test_zero3_gpu.py
    torchrun --nproc_per_node 2 benchmarks/fsdp2_check.py --device cuda   # the stages alone

Models of real shapes with the real tokenizer (tests/real_shapes.py: SmolLM2-135M- and
360M-shaped Llamas, SmolLM2's tokenizer and ChatML template; a Qwen2 teacher of its own
tokenizer for hybrid ULD), float32 weights, launched as users launch them (`axolotl train`
-> `accelerate launch`, one process per GPU). One SGD step (lr 1) of an off-policy window:
2 processes x (micro batch 2, accumulation 2) under FSDP2 must change the weights as one
GPU with (8, 1) does (JSD and hybrid ULD, GOLD_2GPU_REPEATS runs each, default 3). Then
on-policy runs (full fine-tune and LoRA) sample from the gathered student, evaluate, save,
and resume from their checkpoint to the uninterrupted run's weights. The same runs pass
with tiny models on 2 CPU processes (tests/test_fsdp2_train.py).
"""

import os
import shutil

import pytest
import torch

from axolotl_run import gold_config, log_history, relative_l2, report, run_train, sgd_delta, weights, windows
from real_shapes import OVERRIDES

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the device machine)"),
]
REPEATS = int(os.environ.get("GOLD_2GPU_REPEATS", "3"))
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    },
}
LORA = dict(adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True, learning_rate=1e-3)
ULD = {"use_uld_loss": True, "uld_use_hybrid_loss": True}


@pytest.mark.parametrize("loss", ["jsd", "hybrid_uld"])
def test_fsdp2_gradient_matches_one_gpu(real_shape_pairs, tmp_path, loss):
    pair = dict(real_shape_pairs["same" if loss == "jsd" else "cross"])
    pair["train"] = pair["train_complete"]  # off-policy: every row needs its completion
    extra = {**OVERRIDES, **(ULD if loss == "hybrid_uld" else {})}
    ref, w_ref = sgd_delta(pair, tmp_path, "one_gpu", 8, 1, 1, gold_generation_engine="hf", **extra)
    for run in range(REPEATS):
        fsdp, w_fsdp = sgd_delta(pair, tmp_path, f"fsdp2_{run}", 2, 2, 2, **FSDP2, **extra)
        rel = relative_l2(fsdp, ref)
        report(f"{loss} FSDP2 2x(2,2) run {run}: relative L2 difference to one GPU (8,1) = {rel:.2e}")
        assert w_fsdp[0]["scored_tokens"] == w_ref[0]["scored_tokens"] > 0
        assert rel < 1e-4, rel


@pytest.mark.parametrize("adapter", ["full", "lora", "full_static"])
def test_fsdp2_on_policy_eval_save_resume(real_shape_pairs, tmp_path, adapter):
    """``full_static``: the static engine's CUDA graphs, compiled, on the gathered student,
    each process capturing beside NCCL's watchdog thread (``auto``, in the other cases, picks
    the static engine too, uncompiled)."""
    pair = real_shape_pairs["same"]
    engine = dict(gold_generation_engine="static", gold_rollout_compile=True) if adapter == "full_static" else {}
    keys = dict(FSDP2, **OVERRIDES, lmbda=1.0, max_steps=3, save_steps=2, val_set_size=0.25,
                eval_strategy="steps", eval_steps=2, **(LORA if adapter == "lora" else {}), **engine)
    out = run_train(gold_config(pair, tmp_path / "run", **keys), tmp_path / "run", num_processes=2)
    records = windows(out)
    assert [r["engine_calls"] for r in records] == [1, 1, 1]
    if engine:
        assert all(r["engine"] == "StaticCacheEngine" and r["engine_fallbacks"] == 0 for r in records)
    assert all(r["scored_tokens"] > 0 for r in records)
    assert any("eval_loss" in h for h in log_history(out, 2))
    saved = weights(out)
    if adapter != "lora":
        # FSDP2's full state dict names a tied head twice: the copy must be the embedding
        extra = set(saved) - set(weights(pair["student"]))
        assert set(saved) >= set(weights(pair["student"])) and extra <= {"lm_head.weight"}, extra
        if extra:
            torch.testing.assert_close(saved["lm_head.weight"], saved["model.embed_tokens.weight"], rtol=0, atol=0)
    else:
        assert saved and all("lora_" in k for k in saved)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "out").mkdir(parents=True)
    shutil.copytree(out / "checkpoint-2", resumed_dir / "out" / "checkpoint-2")
    cfg = gold_config(pair, resumed_dir, **keys,
                      resume_from_checkpoint=str(resumed_dir / "out" / "checkpoint-2"))
    resumed = run_train(cfg, resumed_dir, num_processes=2)
    assert [r["prompts_sha1"] for r in windows(resumed)] == [records[2]["prompts_sha1"]]
    a, b = weights(out), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
