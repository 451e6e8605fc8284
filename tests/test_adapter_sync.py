"""What the vLLM weight sync pushes for each adapter kind (no vLLM needed): the pushed
tensors, loaded into the base checkpoint as vLLM loads them, give the student's own
log-probabilities (LoRA, DoRA, modules_to_save, trainable tokens, a resumed adapter,
QLoRA with a 4-bit and an 8-bit bitsandbytes base on the CPU backend)."""

import copy

import pytest
import torch

from axolotl_gold.rollouts.vllm.weights import student_weights

VOCAB = 96


def _base(tmp_path, tie=False):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128,  # bnb CPU 4-bit: multiples of 64
        num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path / "base"
    model.save_pretrained(path)
    return str(path)


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _train_adapter(model):
    """Stand-in for training: every trainable tensor moved off its initial value."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _engine_after_sync(base_path, pushed):
    """What a vLLM engine started from the base checkpoint holds after the sync."""
    engine = _load(base_path)
    state = engine.state_dict()
    unknown = [n for n in pushed if n not in state]
    assert not unknown, unknown
    for name, tensor in pushed.items():
        state[name].copy_(tensor)
    return engine


def _logprobs(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().log_softmax(-1)


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "kind",
    ["lora", "dora", "lora_bias", "modules_to_save", "lora_embed_and_head"],
)
def test_adapter_sync_reproduces_the_student(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    base = _base(tmp_path)
    options = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    if kind == "dora":
        options["use_dora"] = True
    if kind == "lora_bias":
        options.update(target_modules=["q_proj", "v_proj"], lora_bias=True)  # Qwen2: biased
    if kind == "modules_to_save":
        options["modules_to_save"] = ["lm_head", "embed_tokens"]
    if kind == "lora_embed_and_head":
        options["target_modules"] = ["embed_tokens", "lm_head", "q_proj"]
    student = _train_adapter(get_peft_model(_load(base), LoraConfig(**options)))
    pushed = dict(student_weights(student))
    if kind == "modules_to_save":
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(pushed)
    if kind == "dora":  # the magnitude term matters: LoRA's delta alone is not the student
        plain = {n: t for n, t in pushed.items()}
        for name, module in student.named_modules():
            if hasattr(module, "lora_magnitude_vector") and module.lora_magnitude_vector:
                ckpt = name.removeprefix("base_model.model.") + ".weight"
                naive = module.get_base_layer().weight + module.get_delta_weight("default")
                assert not torch.allclose(plain[ckpt], naive, atol=1e-4)
    # untouched modules stay out (LoRA syncs are partial)
    assert sum(t.numel() for t in pushed.values()) < sum(p.numel() for p in student.get_base_model().parameters())
    engine = _engine_after_sync(base, pushed)
    torch.testing.assert_close(_logprobs(engine, IDS), _logprobs(student, IDS), atol=1e-4, rtol=0)
    # peft's own merge agrees tensor by tensor
    merged = copy.deepcopy(student).merge_and_unload().state_dict()
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-5, rtol=0)


def test_trainable_token_rows_are_pushed(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _base(tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 7]})
    student = _train_adapter(get_peft_model(_load(base), config))
    pushed = dict(student_weights(student))
    assert "model.embed_tokens.weight" in pushed
    engine = _engine_after_sync(base, pushed)
    torch.testing.assert_close(_logprobs(engine, IDS), _logprobs(student, IDS), atol=1e-4, rtol=0)


def test_resumed_adapter_differs_from_the_base_at_step_0(tmp_path):
    """Resuming from `lora_model_dir`: at step 0 the student is base + trained adapter,
    so an engine started from the base samples from another model until the first sync
    (which the engines now make on the first window)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _base(tmp_path)
    trained = _train_adapter(get_peft_model(_load(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    trained.save_pretrained(tmp_path / "adapter")
    student = PeftModel.from_pretrained(_load(base), str(tmp_path / "adapter"), is_trainable=True)
    stale = _load(base)
    assert (_logprobs(stale, IDS) - _logprobs(student, IDS)).abs().max() > 1e-3
    engine = _engine_after_sync(base, dict(student_weights(student, first=True)))
    torch.testing.assert_close(_logprobs(engine, IDS), _logprobs(student, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_base_is_dequantized_and_pushed_on_the_first_sync(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: F401
    from transformers import BitsAndBytesConfig

    base = _base(tmp_path)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    try:
        quantized = _load(base, quantization_config=quant, device_map={"": "cpu"})
    except Exception as err:  # noqa: BLE001 - a bitsandbytes build without the CPU backend
        pytest.skip(f"bitsandbytes {bits}-bit on CPU unavailable: {err}")
    # LoRA on q/v only: k, o and the MLP stay quantized and untrained
    student = _train_adapter(get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])))
    first = dict(student_weights(student, first=True))
    later = dict(student_weights(student))
    mlp = "model.layers.0.mlp.down_proj.weight"
    assert mlp in first and mlp not in later  # quantized base modules: first sync only
    assert all(t.dtype == torch.float32 for t in first.values())
    engine = _engine_after_sync(base, first)
    full = _load(base)
    # the engine holds what the student computes with (the dequantized base + LoRA) ...
    for name, module in student.named_modules():
        if name.endswith("mlp.down_proj") and not hasattr(module, "lora_A"):
            from peft.utils.integrations import dequantize_bnb_weight

            ckpt = name.removeprefix("base_model.model.") + ".weight"
            expected = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
            torch.testing.assert_close(engine.state_dict()[ckpt], expected.float())
            assert (engine.state_dict()[ckpt] - full.state_dict()[ckpt]).abs().max() > 0  # not the checkpoint's
    # ... so its log-probs are the student's, up to the kernels' rounding (8-bit: the
    # CPU kernel quantizes activations too, which a dequantized weight cannot mimic)
    gap = (_logprobs(engine, IDS) - _logprobs(student, IDS)).abs().max().item()
    stale_gap = (_logprobs(full, IDS) - _logprobs(student, IDS)).abs().max().item()
    print(f"{bits}-bit: engine vs student {gap:.2e}, checkpoint vs student {stale_gap:.2e}")
    assert gap < (1e-2 if bits == 4 else 0.05), gap
    if bits == 4:
        assert gap < stale_gap / 5, (gap, stale_gap)


def test_full_fine_tune_pushes_every_weight(tmp_path):
    model = _load(_base(tmp_path))
    names = [n for n, _ in student_weights(model)]
    assert set(names) == set(model.state_dict())
