"""Teacher placement: a quantized (bitsandbytes 4-bit / 8-bit, CPU backend) or
device_map-placed teacher keeps its placement, its output head stays a plain float
``nn.Linear`` the fused loss applies itself, and an offloaded head falls back to the
model's own logits with the same loss."""

import pytest
import torch

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.settings import TeacherSettings
from axolotl_gold.config.validation import validate_gold_settings
from axolotl_gold.models.teacher import load_teacher, placement_kwargs
from axolotl_gold.scoring.forward import bypassable_head, completion_states
from axolotl_gold.scoring.objectives import JsdObjective

VOCAB = 96


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128,  # bnb CPU 4-bit: multiples of 64
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def _settings(path, **init_kwargs):
    return TeacherSettings(model=path, revision=None, tokenizer=path, dtype="float32", init_kwargs=init_kwargs)


def _batch(width=6):
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 14))
    labels = ids[:, -width:].clone()
    labels[1, -2:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_labels": labels}


def _jsd(student, teacher, fused):
    batch = _batch()
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=4)
    with torch.no_grad():
        return objective(completion_states(student, batch, fused), completion_states(teacher, batch, fused), batch)


def test_placement_kwargs():
    out = placement_kwargs({"load_in_4bit": True, "dtype": torch.bfloat16}, torch.device("cuda", 0))
    assert out["quantization_config"] == {"bnb_4bit_compute_dtype": "bfloat16", "load_in_4bit": True}
    assert out["device_map"] == {"": "cuda:0"} and "load_in_4bit" not in out
    # the user's own compute dtype and device_map win
    mine = {"quantization_config": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16"}, "device_map": "auto"}
    out = placement_kwargs({**mine, "dtype": torch.bfloat16}, torch.device("cuda", 0))
    assert out["quantization_config"]["bnb_4bit_compute_dtype"] == "float16" and out["device_map"] == "auto"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_teacher_keeps_placement_and_a_bypassable_head(teacher_path, bits, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self, raising=True)
    try:
        teacher = load_teacher(_settings(teacher_path, quantization_config={f"load_in_{bits}bit": True}), torch.device("cpu"))
    except Exception as err:  # noqa: BLE001 - a bitsandbytes build without the CPU backend
        pytest.skip(f"bitsandbytes {bits}-bit on CPU unavailable: {err}")
    finally:
        monkeypatch.undo()
    assert seen["quantization_config"][f"load_in_{bits}bit"] and seen["device_map"] == {"": "cpu"}
    assert not [a for a in moved if a and str(a[0]).startswith(("cpu", "cuda"))]  # no .to(device)
    layer = teacher.model.layers[0].mlp.down_proj
    assert type(layer.weight).__name__ == ("Params4bit" if bits == 4 else "Int8Params")
    head = bypassable_head(teacher)
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # head not quantized
    # the fused loss (head applied chunk by chunk) equals the loss on the model's own logits
    student = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    fused, plain = _jsd(student, teacher, True), _jsd(student, teacher, False)
    assert torch.isfinite(fused) and fused > 0
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_quantized_head_is_not_bypassed(teacher_path):
    pytest.importorskip("bitsandbytes")
    quant = {"load_in_8bit": True, "llm_int8_skip_modules": []}  # the head quantized too
    try:
        teacher = load_teacher(_settings(teacher_path, quantization_config=quant), torch.device("cpu"))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 8-bit on CPU unavailable: {err}")
    assert type(teacher.lm_head).__name__ == "Linear8bitLt"
    assert bypassable_head(teacher) is None
    states = completion_states(teacher, _batch(), use_head_bypass=True)
    assert states.head is None and states.values.shape[-1] == VOCAB  # the model's own logits


def test_offloaded_head_falls_back_to_logits(teacher_path, tmp_path):
    """device_map with the head offloaded to disk (accelerate keeps its weight on meta
    between calls): not bypassed, the model applies it, and the loss is unchanged."""
    plain = load_teacher(_settings(teacher_path), torch.device("cpu"))
    device_map = {"model": "cpu", "lm_head": "disk"}
    teacher = load_teacher(_settings(teacher_path, device_map=device_map, offload_folder=str(tmp_path)), torch.device("cpu"))
    assert teacher.lm_head.weight.device.type == "meta"  # placement kept (no .to)
    assert completion_states(teacher, _batch(), use_head_bypass=True).head is None
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    torch.testing.assert_close(_jsd(student, teacher, True), _jsd(student, plain, True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallel", [{"deepspeed": {"zero_optimization": {"stage": 3}}}, {"fsdp_version": 2, "fsdp_config": {"x": 1}}])
def test_quantized_teacher_with_zero3_or_fsdp_is_refused(parallel):
    data = {
        "teacher_model": "t", "micro_batch_size": 2, "gradient_accumulation_steps": 1, "num_generations": 2,
        "sequence_len": 64, "max_completion_length": 16,
        "teacher_model_init_kwargs": {"quantization_config": {"load_in_4bit": True}}, **parallel,
    }
    with pytest.raises(GoldConfigError, match="teacher_model_init_kwargs.quantization_config"):
        validate_gold_settings(data)
