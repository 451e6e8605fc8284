"""Axolotl's class-level patches for the student do not reach a same-architecture teacher.

Real Axolotl code, no mocks: the patches are applied by Axolotl's own functions, the
way `ModelLoader.load` applies them, and undone after each test.
"""

import pytest
import torch
from axolotl.utils.dict import DictDefault

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 4, 3], [8, 8, 60, 12, 77, 5, 1, 0, 90]])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def unpatched_logits(tiny_llama):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(tiny_llama).eval()(IDS).logits


@pytest.fixture
def patchable_llama(monkeypatch):
    """modeling_llama and its classes put back as they were after the test; no records."""
    from transformers.models.llama import modeling_llama

    from axolotl_gold.models import isolation

    monkeypatch.setattr(isolation, "_RECORDS", {})
    targets = [modeling_llama] + [
        v for v in vars(modeling_llama).values() if isinstance(v, type) and v.__module__ == modeling_llama.__name__
    ]
    saved = [(t, dict(vars(t))) for t in targets]
    yield modeling_llama
    for target, before in saved:
        for name in set(vars(target)) - set(before):
            delattr(target, name)
        for name, value in before.items():
            if vars(target).get(name) is not value:
                setattr(target, name, value)


def record_via_plugin(path):
    """What `axolotl train` does first: load the config, which runs the plugins' `register`."""
    from axolotl_gold.plugin import GoldPlugin

    GoldPlugin().register(DictDefault(base_model=path, teacher_model=path, datasets=[]))


def patch_lora_attention(path):
    """Axolotl's default `lora_qkv_kernel`/`lora_o_kernel`: `Attention.forward` rewritten."""
    from axolotl.monkeypatch.lora_kernels import patch_self_attn_lora

    patch_self_attn_lora(DictDefault(base_model=path, lora_qkv_kernel=True, lora_o_kernel=True))


def load(path):
    from axolotl_gold.config.settings import GoldSettings
    from axolotl_gold.models.teacher import load_teacher

    return load_teacher(GoldSettings.from_cfg(DictDefault(teacher_model=path)).teacher, torch.device("cpu"))


def test_teacher_runs_the_original_attention_under_lora_kernels(tiny_llama, unpatched_logits, patchable_llama):
    record_via_plugin(tiny_llama)
    patch_lora_attention(tiny_llama)
    assert "apply_qkv" in patchable_llama.LlamaAttention.forward.__code__.co_names  # the crash's cause

    teacher = load(tiny_llama)
    with torch.no_grad():
        logits = teacher(IDS).logits  # unfixed: 'LlamaAttention' object has no attribute 'apply_qkv'
    torch.testing.assert_close(logits, unpatched_logits, rtol=0, atol=0)
    assert "apply_qkv" in patchable_llama.LlamaAttention.forward.__code__.co_names  # the class keeps it


def test_student_keeps_the_lora_kernels(tiny_llama, unpatched_logits, patchable_llama):
    """Axolotl's post-load half (`apply_lora_kernel_patches`) on a PEFT student, as in training."""
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from axolotl.kernels.lora import apply_lora_o, apply_lora_qkv

    record_via_plugin(tiny_llama)
    patch_lora_attention(tiny_llama)
    patched_forward = patchable_llama.LlamaAttention.forward
    student = get_peft_model(
        LlamaForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    apply_lora_kernel_patches(student, DictDefault(lora_qkv_kernel=True, lora_o_kernel=True))

    teacher = load(tiny_llama)

    attention = student.base_model.model.model.layers[0].self_attn
    assert "forward" not in vars(attention) and attention.forward.__func__ is patched_forward
    assert attention.apply_qkv.__func__ is apply_lora_qkv and attention.apply_o.__func__ is apply_lora_o
    assert patchable_llama.LlamaAttention.forward is patched_forward
    with torch.no_grad():  # LoRA's B starts at zero: the student computes the base model
        torch.testing.assert_close(student(IDS).logits, unpatched_logits)
        torch.testing.assert_close(teacher(IDS).logits, unpatched_logits, rtol=0, atol=0)
    teacher_attention = teacher.model.layers[0].self_attn
    assert teacher_attention.forward.__func__ is not patched_forward
    assert not hasattr(teacher_attention, "apply_qkv")


def test_teacher_is_built_from_the_original_classes_under_liger(tiny_llama, unpatched_logits, patchable_llama):
    """Liger's RMSNorm / SwiGLU class swaps and its fused-linear-CE `LlamaForCausalLM.forward`.

    Liger's RoPE is left off: it swaps a function the forward looks up while it runs,
    which the teacher shares (it is the same computation for any instance), and its
    Triton kernel cannot run on a CPU.
    """
    from axolotl.integrations.liger.plugin import LigerPlugin
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    record_via_plugin(tiny_llama)
    LigerPlugin().pre_model_load(
        DictDefault(
            model_config_type="llama",
            liger_rope=False,
            liger_rms_norm=True,
            liger_glu_activation=True,
            liger_fused_linear_cross_entropy=True,
        )
    )
    assert patchable_llama.LlamaRMSNorm is LigerRMSNorm and patchable_llama.LlamaMLP is LigerSwiGLUMLP
    lce_forward = patchable_llama.LlamaForCausalLM.forward

    teacher = load(tiny_llama)

    assert not any(isinstance(m, (LigerRMSNorm, LigerSwiGLUMLP)) for m in teacher.modules())
    assert teacher.forward.__func__ is not lce_forward
    with torch.no_grad():
        torch.testing.assert_close(teacher(IDS).logits, unpatched_logits, rtol=0, atol=0)
    # the student's patches stay in place for models built after the teacher
    assert patchable_llama.LlamaRMSNorm is LigerRMSNorm and patchable_llama.LlamaForCausalLM.forward is lce_forward


def test_teacher_load_error_leaves_the_patches_in_place(tiny_llama, patchable_llama):
    from axolotl_gold.models.isolation import original_modeling

    record_via_plugin(tiny_llama)
    patch_lora_attention(tiny_llama)
    patched_forward = patchable_llama.LlamaAttention.forward
    with pytest.raises(RuntimeError), original_modeling():
        assert "apply_qkv" not in patchable_llama.LlamaAttention.forward.__code__.co_names
        raise RuntimeError("teacher failed to load")
    assert patchable_llama.LlamaAttention.forward is patched_forward


def test_unpatched_modeling_is_left_alone(tiny_llama, unpatched_logits, patchable_llama):
    from axolotl_gold.models.isolation import restore_original_attributes

    record_via_plugin(tiny_llama)
    teacher = load(tiny_llama)
    assert restore_original_attributes(teacher) == {}
    assert not any("forward" in vars(m) for m in teacher.modules())


def test_unresolvable_teacher_records_nothing(patchable_llama):
    from axolotl_gold.models.teacher import record_teacher_modeling

    assert record_teacher_modeling(DictDefault(teacher_model="/no/such/teacher")) == []


@pytest.mark.e2e
def test_axolotl_train_lora_kernels_with_a_same_architecture_teacher(tiny_pair, tmp_path):
    """The reported crash, end to end: Axolotl's QKV/O LoRA kernels (plain torch, so they
    run on a CPU; the MLP kernel needs Triton) patch `Qwen2Attention.forward`, and the Qwen2
    teacher's first forward failed on `apply_qkv`."""
    from axolotl_run import gold_config, run_train, windows

    cfg = gold_config(
        tiny_pair, tmp_path, lmbda=0.5, max_steps=2, save_steps=2,
        adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True,
        gold_generation_engine="static",
        lora_qkv_kernel=True, lora_o_kernel=True, lora_mlp_kernel=False,
    )
    out = run_train(cfg, tmp_path)
    assert "Patched attention class with LoRA optims: Qwen2Attention" in (tmp_path / "log.txt").read_text()
    assert len(windows(out)) == 2
