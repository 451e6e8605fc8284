"""`axolotl train` with GOLD under FSDP2 on 2 CPU processes (gloo).

Accelerate enables FSDP for accelerator back-ends only, and Axolotl builds its device mesh
for "cuda" by name; ``tests/cpu_fsdp2_train.py`` completes both choices for CPU processes
(see its docstring), and everything else is the product path: Axolotl shards the student
with ``fully_shard`` (``fsdp_config``), GOLD loads the teacher on process 0's CPU and shards
it for inference, gathers the student once per on-policy window and the heads once per
micro-step, and saves through Accelerate's FSDP2 state dicts. On 2 GPUs:
``tests/test_fsdp2_gpu.py``.
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from axolotl_run import gold_config, log_history, relative_l2, run_train, sgd_delta, windows
from axolotl_run import weights as _weights

pytestmark = pytest.mark.e2e

FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    },
}
LORA = dict(
    adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
    learning_rate=1e-2, lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
)


def _log(workdir) -> str:
    return (workdir / "log.txt").read_text()


def _held(log: str, who: str) -> list[str]:
    """How each process held ``who`` (GOLD's INFO line, printed by the CPU launcher)."""
    return re.findall(rf"GOLD {who} under FSDP2: (.*)", log)


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_full_finetune_on_policy_eval_save_resume(tiny_pair, tmp_path):
    run = tmp_path / "run"
    keys = dict(FSDP2, lmbda=1.0, max_steps=3, save_steps=2, val_set_size=0.25,
                eval_strategy="steps", eval_steps=2)
    cfg = gold_config(tiny_pair, run, **keys)
    out = run_train(cfg, run, num_processes=2)
    log = _log(run)
    # both models sharded on both processes: about half of each model's parameters here
    for who in ("teacher", "student"):
        held = _held(log, who)
        assert len(held) == 2 and all("sharded" in h for h in held), held
        shares = [float(re.search(r"([0-9.]+) of its", h).group(1)) for h in held]
        assert all(0.3 < s < 0.7 for s in shares), (who, shares)
    records = windows(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["engine_calls"] for r in records] == [1, 1, 1]  # one generation call per window
    history = log_history(out, 2)
    losses = _losses(history)
    assert len(losses) == 2 and all(math.isfinite(l) and l > 0 for l in losses)
    evals = [h for h in history if "eval_loss" in h]
    assert evals and all(math.isfinite(h["eval_loss"]) and h["eval_completion_length"] > 0 for h in evals)
    # checkpoint in Accelerate's FSDP format (resumable), the final model as one full student
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").exists() and (checkpoint / "optimizer.bin").exists()
    before, after = _weights(tiny_pair["student"]), _weights(out)
    assert before.keys() == after.keys()  # the student's tensors only: no teacher, no shards
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)

    # resume from checkpoint-2 (teacher replicated this time): the same last window and
    # the same final weights as the uninterrupted run
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "out").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed_dir / "out" / "checkpoint-2")
    cfg = gold_config(
        tiny_pair, resumed_dir, **keys, gold_teacher_replicate=True,
        resume_from_checkpoint=str(resumed_dir / "out" / "checkpoint-2"),
    )
    resumed = run_train(cfg, resumed_dir, num_processes=2)
    held = _held(_log(resumed_dir), "teacher")
    assert len(held) == 2 and all(h.startswith("replicated") for h in held), held
    replayed = windows(resumed)
    assert [r["step"] for r in replayed] == [2]
    assert replayed[0]["prompts_sha1"] == records[2]["prompts_sha1"]
    assert replayed[0]["scored_tokens"] == records[2]["scored_tokens"]
    a, b = _weights(out), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# the static engine samples from the gathered student (and, for seq_kd, the gathered
# teacher) with FSDP's forward hooks set aside, 2 rows at once: the others start in
# refilled slots (eager on the CPU; its CUDA graphs on the GPU: tests/test_fsdp2_gpu.py)
STATIC = dict(gold_generation_engine="static", gold_generation_rows=2)


def test_lora_seq_kd_save_resume(tiny_pair, tmp_path):
    run = tmp_path / "run"
    cfg = gold_config(tiny_pair, run, **FSDP2, **LORA, **STATIC, lmbda=0.5, seq_kd=True, max_steps=3, save_steps=2)
    out = run_train(cfg, run, num_processes=2)
    records = windows(out)
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]
    assert all(r["engine"] == "StaticCacheEngine" and r["engine_fallbacks"] == 0 for r in records)
    on_policy_prompts = [2 * sum(r["on_policy"]) for r in records]  # 2 prompts a slice on this process
    assert records[-1]["engine_refills"] == sum(max(0, n - 2) for n in on_policy_prompts)
    # seq_kd: the sharded teacher gathered for its own rollouts, once per window that has an
    # off-policy slice
    assert records[-1]["teacher_engine_calls_total"] == sum(not all(r["on_policy"]) for r in records)
    assert any(all(r["on_policy"]) for r in records) or any(not any(r["on_policy"]) for r in records)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    adapter = _weights(out)
    assert adapter and all("lora_" in k for k in adapter)  # the adapter only
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pair["student"]), str(out))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "out").mkdir(parents=True)
    shutil.copytree(out / "checkpoint-2", resumed_dir / "out" / "checkpoint-2")
    cfg = gold_config(
        tiny_pair, resumed_dir, **FSDP2, **LORA, **STATIC, lmbda=0.5, seq_kd=True, max_steps=3, save_steps=2,
        resume_from_checkpoint=str(resumed_dir / "out" / "checkpoint-2"),
    )
    resumed = run_train(cfg, resumed_dir, num_processes=2)
    replayed = windows(resumed)
    assert [r["step"] for r in replayed] == [2]
    assert replayed[0]["on_policy"] == records[2]["on_policy"]
    assert replayed[0]["prompts_sha1"] == records[2]["prompts_sha1"]
    a, b = _weights(out), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["jsd", "hybrid_uld"])
def test_sgd_step_matches_one_process(request, tmp_path, loss):
    """One SGD step (lr 1) of an off-policy window: 2 FSDP2 processes x (micro 2, accum 2)
    change the weights as one process with (8, 1) does."""
    pair = request.getfixturevalue("tiny_pair" if loss == "jsd" else "tiny_cross_pair")
    extra = {"use_uld_loss": True, "uld_use_hybrid_loss": True} if loss == "hybrid_uld" else {}
    ref, w_ref = sgd_delta(pair, tmp_path, "one", 8, 1, 1, **extra)
    fsdp, w_fsdp = sgd_delta(pair, tmp_path, "fsdp2", 2, 2, 2, **FSDP2, **extra)
    assert w_ref[0]["scored_tokens"] == w_fsdp[0]["scored_tokens"]
    assert len(_held(_log(tmp_path / "fsdp2"), "student")) == 2
    rel = relative_l2(fsdp, ref)
    print(f"{loss}: FSDP2 2 x (2,2) vs one process (8,1): relative L2 = {rel:.2e}")
    assert rel < 1e-4, rel
