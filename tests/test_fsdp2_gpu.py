"""`axolotl train` + GOLD under FSDP2 on 2 GPUs (NCCL), against one GPU without FSDP.

Needs 2 CUDA GPUs, so CI (CPU only) skips it; on the device machine:

    pytest -q -s tests/test_fsdp2_gpu.py                 # 2 GPUs, Axolotl installed
    torchrun --nproc_per_node 2 benchmarks/fsdp2_check.py --device cuda   # the stages alone

One SGD step (lr 1) of an off-policy window: 2 processes x (micro batch 2, accumulation 2)
under FSDP2 must change the weights as one GPU with (8, 1) does (JSD and hybrid ULD). Then
on-policy runs (full fine-tune and LoRA) sample from the gathered student, evaluate, save,
and resume from their checkpoint to the uninterrupted run's weights. The same runs pass on
2 CPU processes (tests/test_fsdp2_train.py); here NCCL, CUDA and `bf16`-free fp32 are the
difference.
"""

import shutil

import pytest
import torch

from axolotl_run import gold_config, log_history, relative_l2, run_train, sgd_delta, weights, windows

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the device machine)"),
]
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    },
}
LORA = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True, learning_rate=1e-2)


@pytest.mark.parametrize("loss", ["jsd", "hybrid_uld"])
def test_fsdp2_gradient_matches_one_gpu(request, tmp_path, loss):
    pair = request.getfixturevalue("tiny_pair" if loss == "jsd" else "tiny_cross_pair")
    extra = {"use_uld_loss": True, "uld_use_hybrid_loss": True} if loss == "hybrid_uld" else {}
    ref, w_ref = sgd_delta(pair, tmp_path, "one_gpu", 8, 1, 1, gold_generation_engine="hf", **extra)
    fsdp, w_fsdp = sgd_delta(pair, tmp_path, "fsdp2", 2, 2, 2, **FSDP2, **extra)
    rel = relative_l2(fsdp, ref)
    print(f"{loss} FSDP2 2x(2,2): relative L2 difference to one GPU (8,1) = {rel:.2e}")
    assert w_fsdp[0]["scored_tokens"] == w_ref[0]["scored_tokens"]
    assert rel < 1e-4, rel


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_fsdp2_on_policy_eval_save_resume(tiny_pair, tmp_path, adapter):
    keys = dict(FSDP2, lmbda=1.0, max_steps=3, save_steps=2, val_set_size=0.25,
                eval_strategy="steps", eval_steps=2, **(LORA if adapter == "lora" else {}))
    out = run_train(gold_config(tiny_pair, tmp_path / "run", **keys), tmp_path / "run", num_processes=2)
    records = windows(out)
    assert [r["engine_calls"] for r in records] == [1, 1, 1]
    assert any("eval_loss" in h for h in log_history(out, 2))
    saved = weights(out)
    if adapter == "full":
        assert set(saved) == set(weights(tiny_pair["student"]))
    else:
        assert saved and all("lora_" in k for k in saved)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "out").mkdir(parents=True)
    shutil.copytree(out / "checkpoint-2", resumed_dir / "out" / "checkpoint-2")
    cfg = gold_config(tiny_pair, resumed_dir, **keys,
                      resume_from_checkpoint=str(resumed_dir / "out" / "checkpoint-2"))
    resumed = run_train(cfg, resumed_dir, num_processes=2)
    assert [r["prompts_sha1"] for r in windows(resumed)] == [records[2]["prompts_sha1"]]
    a, b = weights(out), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
