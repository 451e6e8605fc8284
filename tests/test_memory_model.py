"""benchmarks/memory_model.py's per-part sizes against the real objects they predict."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_model as mm  # noqa: E402

SHAPE = mm.Shape("tiny Qwen3", 256, 2, 4, 2, 64, 512, 1024, tied=False)


def _qwen3(shape: mm.Shape):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
    )
    return Qwen3ForCausalLM(config)


def test_lora_params_equal_peft_trainable_parameters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_qwen3(SHAPE), LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == mm.lora_params(SHAPE, 16)


def _nf4_state(shape: mm.Shape, path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _qwen3(shape).to(torch.bfloat16).save_pretrained(path)
    quantized = AutoModelForCausalLM.from_pretrained(
        path, device_map={"": "cpu"}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True),
    )
    state = quantized.state_dict()
    linear = sum(t.numel() * t.element_size() for k, t in state.items() if "_proj." in k)
    return sum(t.numel() * t.element_size() for t in state.values()), linear


def _linear_params(shape: mm.Shape) -> int:
    return shape.layers * (shape.layer_params - 2 * shape.hidden - (shape.q + 2 * shape.kv))  # no qkv bias


def test_nf4_teacher_bytes_match_a_bitsandbytes_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    held, _ = _nf4_state(SHAPE, tmp_path / "a")
    predicted = mm.peak_lora_quantized_teacher(SHAPE, SHAPE, mm.Workload())["parts"]["teacher (nf4)"]
    assert predicted == pytest.approx(held, rel=0.02), (predicted, held)
    # per quantized weight, without bitsandbytes' fixed ~1 KiB per module (code books), which
    # a tiny model shows and a 14B one does not: the slope between two widths
    wide = mm.Shape("wider", 256, 2, 4, 2, 64, 2048, 1024, tied=False)
    _, small_linear = _nf4_state(SHAPE, tmp_path / "a2")
    _, wide_linear = _nf4_state(wide, tmp_path / "b")
    per_weight = (wide_linear - small_linear) / (_linear_params(wide) - _linear_params(SHAPE))
    assert per_weight == pytest.approx(mm.NF4_BYTES, rel=0.002), per_weight


def test_the_workload_uses_the_plugins_loss_chunk():
    from axolotl_gold.config.schema import LOSS_CHUNK_SIZE

    assert mm.Workload().chunk == LOSS_CHUNK_SIZE
