"""End-to-end `axolotl train` runs on tiny local vision-language models (CPU).

Same family (LLaVA teacher and student, one processor, JSD) and cross family
(Gemma 3 teacher, ULD), full fine-tune and LoRA, ``num_generations`` 2 and
``gradient_accumulation_steps`` 2, through Axolotl's multimodal settings.
"""

import math

import pytest
import torch

from axolotl_run import gold_config, log_history, run_train, windows
from axolotl_run import weights as _weights
from test_e2e_train import _sha, _train_losses

pytestmark = pytest.mark.e2e


def vlm_config(vlms, tmp_path, family: str, **overrides):
    pair = {"student": vlms["student"], "train": vlms["train"]}
    pair["teacher"] = vlms["teacher"] if family == "same" else vlms["teacher_gemma3"]
    extra = dict(
        processor_type="AutoProcessor",
        skip_prepare_dataset=True,
        remove_unused_columns=False,
        sequence_len=128,
        lmbda=0.5,
        num_generations=2,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        datasets=[{"path": vlms["train"], "ds_type": "json", "type": "axolotl_gold.vision.chat_template"}],
    )
    if family == "cross":
        extra.update(use_uld_loss=True, uld_use_hybrid_loss=True)
    extra.update(overrides)
    return gold_config(pair, tmp_path, **extra)


def _check_windows(out):
    records = windows(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    # one generation call per optimizer window, only when a slice is on-policy
    assert [r["engine_calls"] for r in records] == [int(any(r["on_policy"])) for r in records]
    assert all(r["scored_tokens"] > 0 for r in records)
    assert len({r["prompts_sha1"] for r in records}) == 3  # different images per window
    return records


@pytest.mark.parametrize("family", ["same", "cross"])
def test_full_finetune_vision_tower_frozen(tiny_vlms, tmp_path, family):
    teacher = tiny_vlms["teacher"] if family == "same" else tiny_vlms["teacher_gemma3"]
    teacher_sha = _sha(teacher)
    overrides = {}
    if family == "same":  # evaluation on held-out rows too
        overrides = dict(val_set_size=0.25, eval_strategy="steps", eval_steps=3)
    out = run_train(vlm_config(tiny_vlms, tmp_path, family, **overrides), tmp_path)
    history = log_history(out, 3)
    losses = _train_losses(history)
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    if family == "same":
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        assert evals and all(math.isfinite(l) and l > 0 for l in evals)
    _check_windows(out)
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(out)
    before, after = _weights(tiny_vlms["student"]), _weights(out)
    tower = [k for k in before if "vision_tower" in k]
    language = [k for k in before if "language_model" in k]
    assert tower and language
    assert all(torch.equal(before[k], after[k]) for k in tower)  # frozen by default
    assert any(not torch.equal(before[k], after[k]) for k in language)
    assert _sha(teacher) == teacher_sha


@pytest.mark.parametrize("family", ["same", "cross"])
def test_lora_on_the_language_model(tiny_vlms, tmp_path, family):
    cfg = vlm_config(
        tiny_vlms, tmp_path, family,
        adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"],  # names the vision tower's too
        learning_rate=1e-2,
        lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
    )
    out = run_train(cfg, tmp_path)
    assert (out / "adapter_config.json").exists()
    assert all(math.isfinite(l) for l in _train_losses(log_history(out, 3)))
    _check_windows(out)
    adapter = _weights(out)
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    tower = [v for k, v in lora_b.items() if "vision_tower" in k]
    language = [v for k, v in lora_b.items() if "language_model" in k]
    assert tower and language
    assert all(v.abs().sum() == 0 for v in tower)  # adapters there stay frozen at zero
    assert any(v.abs().sum() > 0 for v in language)


def test_static_engine_samples_with_images(tiny_vlms, tmp_path):
    """`gold_generation_engine: static` on a vision-language student: the processor's batch
    prefilled through the model's own forward, then the static engine's decode steps."""
    out = run_train(vlm_config(tiny_vlms, tmp_path, "same", gold_generation_engine="static"), tmp_path)
    losses = _train_losses(log_history(out, 3))
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)
    records = _check_windows(out)
    assert {r["engine"] for r in records} == {"StaticCacheEngine"}
    assert records[-1]["engine_fallbacks"] == 0 and records[-1]["engine_calls_total"] >= 1
