"""The decode step's fused projections (``rollouts/engines/fused_projections.py``): each layer's
q/k/v and gate/up projections as one GEMM each on a copy of their weights, against the model's
own modules."""

import pytest
import torch
from torch import nn

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.fused_projections import _First, _Rest, fused_groups, fused_projections
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.rollouts.engines.static import StaticCacheEngine

VOCAB, PAD, EOS = 97, 0, 1


def _model(bias_free_mlp=True, device="cpu", dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.lm_head.weight.data.mul_(40.0)  # peaked: greedy choices far from ties
    return model


def test_fused_groups_give_the_models_outputs_and_leave_it_as_it_was():
    """Qwen2's q/k/v (with biases) and gate/up (without) of every layer are grouped; the
    logits are the model's own (float32, the CPU: to the bit); the modules and the parameters'
    names are back on exit."""
    model = _model()
    ids = torch.randint(2, VOCAB, (3, 9))
    names = [n for n, _ in model.named_parameters()]
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    before = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
    with torch.no_grad():
        expected = model(ids).logits
        with fused_projections(model) as groups:
            assert groups == 4
            assert type(attn.q_proj) is _First and type(attn.v_proj) is _Rest and type(mlp.up_proj) is _Rest
            assert attn.q_proj.bias is not None and mlp.gate_proj.bias is None
            fused = model(ids).logits
    assert torch.equal(fused, expected)
    assert (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj) == before
    assert [n for n, _ in model.named_parameters()] == names


def test_the_copies_follow_the_weights_and_a_later_projection_on_another_input_computes_its_own():
    """A trained student's weights change between calls: each entry copies them again. A
    group's later projection called on a tensor other than the first one's input (another
    call order, another input) is the original projection of that tensor."""
    model = _model()
    ids = torch.randint(2, VOCAB, (2, 6))
    with torch.no_grad():
        with fused_projections(model):
            pass
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.add_(0.5)
            layer.mlp.up_proj.weight.mul_(-1.0)
        expected = model(ids).logits
        with fused_projections(model):
            assert torch.equal(model(ids).logits, expected)
            attn = model.model.layers[0].self_attn
            x, other = torch.randn(4, 64), torch.randn(4, 64)
            original_k = attn.k_proj.original[0]
            attn.q_proj(x)
            assert torch.equal(attn.k_proj(x), original_k(x))  # the shared slice
            assert torch.equal(attn.k_proj(other), original_k(other))  # its own GEMM
            assert not torch.equal(attn.k_proj(other), original_k(x))


# the group's A GEMM sums a LoRA layer's products in another kernel than peft's own: float32
# rounding (logits of size ~10 here: ~1e-5 apart; a wrong slice or scaling is off by ~1)
_ROUNDING = dict(rtol=1e-5, atol=1e-4)


def _lora(model, targets, **extra):
    """A peft LoRA model with random ``B`` (``init_lora_weights=False``: the adapters change the outputs)."""
    from peft import LoraConfig, get_peft_model

    config = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                  init_lora_weights=False)
    return get_peft_model(model, LoraConfig(**{**config, **extra}))


def test_lora_layers_are_grouped_with_their_adapters_and_other_kinds_are_not():
    """A plain LoRA layer groups with its neighbours, LoRA or not (its base weight in the copy,
    its ``A`` in the group's ``A`` copy); a DoRA layer, a merged adapter or another module
    type leaves its group unfused, and the other group of the layer is still fused."""
    model = _lora(_model(), ["q_proj", "v_proj"])
    groups = fused_groups(model)
    assert {tuple(names) for _, names, _ in groups} == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert len(groups) == 4  # two a layer
    qkv = next(stand_ins[0] for _, names, stand_ins in groups if names[0] == "q_proj")
    assert [i for i, _, _ in qkv.loras] == [0, 2] and qkv.ranks == [4, 4] and qkv.lora_a.shape == (8, 64)
    qkv.refresh()
    q, k, v = qkv.lora_b.split(qkv.sizes)  # B block-diagonal: q's rows use rank block 0, v's block 1, k none
    assert q[:, 4:].count_nonzero() == 0 and k.count_nonzero() == 0 and v[:, :4].count_nonzero() == 0
    assert q[:, :4].count_nonzero() > 0 and v[:, 4:].count_nonzero() > 0
    dora = _lora(_model(), ["q_proj", "v_proj"], use_dora=True)
    assert {tuple(names) for _, names, _ in fused_groups(dora)} == {("gate_proj", "up_proj")}
    merged = _lora(_model(), ["gate_proj"])
    merged.merge_adapter()
    assert {tuple(names) for _, names, _ in fused_groups(merged)} == {("q_proj", "k_proj", "v_proj")}
    other = _model()

    class Scaled(nn.Linear):
        pass

    other.model.layers[0].mlp.up_proj = Scaled(64, 96, bias=False)
    assert len(fused_groups(other)) == 3  # layer 0's gate/up left alone


@pytest.mark.parametrize("targets,alpha", [(["q_proj", "v_proj"], 8), ("all-linear", 8), ("all-linear", 5)])
def test_lora_groups_give_peft_outputs_and_follow_the_adapters(targets, alpha):
    """Within the block a LoRA student's logits are peft's own (float32, the CPU), after the
    adapters and base weights change too (a training step between calls), with a scaling
    that is not a power of two too (1.25); with dropout on (training mode) each projection
    runs its own module, as without the block."""
    model = _lora(_model(), targets, lora_alpha=alpha).eval()
    ids = torch.randint(2, VOCAB, (3, 9))
    with torch.no_grad():
        expected = model(ids).logits
        with fused_projections(model) as groups:
            assert groups == 4
            fused = model(ids).logits
        torch.testing.assert_close(fused, expected, **_ROUNDING)
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "up_proj.base_layer" in name:
                param.add_(0.05 * torch.randn_like(param))
        expected = model(ids).logits
        with fused_projections(model):
            torch.testing.assert_close(model(ids).logits, expected, **_ROUNDING)
    dropping = _lora(_model(), targets, lora_dropout=0.3).train()
    with torch.no_grad():
        torch.manual_seed(3)
        expected = dropping(ids).logits
        with fused_projections(dropping):
            torch.manual_seed(3)
            assert torch.equal(dropping(ids).logits, expected)


def test_axolotl_lora_kernels_give_way_to_the_groups_inside_the_block():
    """Axolotl's LoRA kernels (bound by its own `apply_lora_kernel_patches`, on by default for
    LoRA) read the projections' parameters: within the block the attention's `apply_qkv`
    calls the stand-ins and the MLP runs its class forward (its kernel is CUDA-only; here it
    would fail); both bindings are Axolotl's again on exit."""
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches
    from axolotl.utils.dict import DictDefault

    model = _lora(_model(), "all-linear").eval()
    ids = torch.randint(2, VOCAB, (2, 7))
    attn, mlp = model.base_model.model.model.layers[0].self_attn, model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected, expected_qkv = model(ids).logits, (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    apply_lora_kernel_patches(model, DictDefault(lora_qkv_kernel=True, lora_o_kernel=True, lora_mlp_kernel=True))
    axolotl_qkv, axolotl_mlp = vars(attn)["apply_qkv"], vars(mlp)["forward"]
    assert axolotl_qkv.__func__.__name__ == "apply_lora_qkv" and axolotl_mlp.__func__.__name__ == "apply_lora_mlp_swiglu"
    with torch.no_grad(), fused_projections(model) as groups:
        assert groups == 4 and "forward" not in vars(mlp)
        assert type(attn.q_proj) is _First
        for got, want in zip(attn.apply_qkv(x), expected_qkv):
            torch.testing.assert_close(got, want, **_ROUNDING)
        torch.testing.assert_close(model(ids).logits, expected, **_ROUNDING)
    assert vars(attn)["apply_qkv"] is axolotl_qkv and vars(mlp)["forward"] is axolotl_mlp
    assert type(attn.q_proj).__name__ == "Linear" and hasattr(attn.q_proj, "lora_A")


def test_an_unknown_replacement_of_a_parents_forward_leaves_its_group_unfused():
    """A parent whose forward path was replaced by something other than Axolotl's LoRA
    kernels may read the projections' parameters itself: its group stays as it is."""
    model = _model()
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x)  # someone's patch
    ids = torch.randint(2, VOCAB, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
        with fused_projections(model) as groups:
            assert groups == 3 and type(mlp.gate_proj) is nn.Linear
            assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_fused_step_traces_as_one_graph(lora):
    """No graph break through the stand-ins (the compiled decode step keeps one graph)."""
    model = _lora(_model(), "all-linear").eval() if lora else _model()
    ids = torch.randint(2, VOCAB, (2, 5))
    with torch.no_grad(), fused_projections(model):
        explained = torch._dynamo.explain(lambda x: model(x).logits)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 1, 7)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled, captured step needs CUDA"))])
def test_static_engine_with_fused_projections_matches_generate(device, lora, monkeypatch):
    """Greedy completions equal HF generate's, refilled slots and (CUDA) the compiled step
    included, for a full model and a LoRA student (every linear layer adapted); a second call
    after a weight update decodes with the new weights."""
    model = _model(device=device)
    if lora:
        model = _lora(model, "all-linear").eval()
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    cuda = device == "cuda"
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS}, fuse_projections=True, batch_size=3,
                             eos_check_every=4, compile_decode=cuda)
    prompts = _prompts() + _prompts(1)
    refreshed = []  # each installed group copies its weights on entry
    original_refresh = _First.refresh
    monkeypatch.setattr(_First, "refresh", lambda self: refreshed.append(self) or original_refresh(self))
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert len(refreshed) >= 4 and (not lora or all(group.loras for group in refreshed))
    layers = model.get_decoder().layers
    with torch.no_grad():
        for layer in layers:
            layer.mlp.gate_proj.weight.mul_(1.5)  # a LoRA layer's: its base layer's
            if lora:
                layer.mlp.up_proj.lora_B["default"].weight.mul_(-1.0)
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert all(type(layer.mlp.gate_proj).__name__ == "Linear" for layer in layers)


def test_groups_are_made_anew_when_the_projections_are_replaced_or_cast():
    """Kept groups stand for the modules they were made from: a projection wrapped later (peft)
    joins a new group as a LoRA layer, a model cast to another dtype gets copies in it, and a
    merged adapter leaves its group unfused."""
    model = _model()
    ids = torch.randint(2, VOCAB, (2, 6))
    first_groups = fused_groups(model)
    assert len(first_groups) == 4
    model.to(torch.float64)
    with torch.no_grad(), fused_projections(model):
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    peft_model = _lora(model, ["q_proj"])
    with torch.no_grad():
        expected = peft_model(ids.clone()).logits
        with fused_projections(peft_model):
            q_proj = model.model.layers[0].self_attn.q_proj
            assert type(q_proj) is _First and [i for i, _, _ in q_proj.loras] == [0]
            fused = peft_model(ids.clone()).logits
    torch.testing.assert_close(fused, expected)
    peft_model.merge_adapter()
    assert {tuple(names) for _, names, _ in fused_groups(peft_model)} == {("gate_proj", "up_proj")}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_path_with_fused_projections_and_refills_matches_generate_on_the_cpu(monkeypatch, lora):
    """The engine's compiled path (row buckets, refilled slots, the compiled step's in-place
    cache writes) with fused projections, run through torch.compile on the CPU (no graph
    capture there): greedy completions equal HF generate's; a LoRA student with some
    projections adapted (groups of LoRA and plain layers) too."""
    import axolotl_gold.rollouts.engines.static as static

    monkeypatch.setattr(static.StaticCacheEngine, "_compiling", lambda self, device: True)
    torch._dynamo.reset()
    model = _lora(_model(), ["q_proj", "v_proj", "up_proj"]).eval() if lora else _model()
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS}, fuse_projections=True, batch_size=3,
                             eos_check_every=4)
    prompts = _prompts() + _prompts(1)
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert fast.refills > 0
