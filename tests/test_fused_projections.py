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


def test_only_plain_linears_of_one_kind_are_grouped():
    """peft's LoRA projections (and any other module type) stay themselves; the untouched
    group of the same layer is still fused."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    kinds = {tuple(names) for _, names, _ in fused_groups(model)}
    assert kinds == {("gate_proj", "up_proj")}
    assert len(fused_groups(model)) == 2  # one per layer


def test_the_fused_step_traces_as_one_graph():
    """No graph break through the stand-ins (the compiled decode step keeps one graph)."""
    model = _model()
    ids = torch.randint(2, VOCAB, (2, 5))
    with torch.no_grad(), fused_projections(model):
        explained = torch._dynamo.explain(lambda x: model(x).logits)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 1, 7)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled, captured step needs CUDA"))])
def test_static_engine_with_fused_projections_matches_generate(device):
    """Greedy completions equal HF generate's, refilled slots and (CUDA) the compiled step
    included; a second call after a weight update decodes with the new weights."""
    model = _model(device=device)
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    cuda = device == "cuda"
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS}, fuse_projections=True, batch_size=3,
                             eos_check_every=4, compile_decode=cuda)
    prompts = _prompts() + _prompts(1)
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(1.5)
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert all(type(layer.mlp.gate_proj) is nn.Linear for layer in model.model.layers)


def test_groups_are_made_anew_when_the_projections_are_replaced_or_cast():
    """Kept groups stand for the modules they were made from: a projection wrapped later (peft)
    is not put back by the stand-ins, and a model cast to another dtype gets copies in it."""
    from peft import LoraConfig, get_peft_model

    model = _model()
    ids = torch.randint(2, VOCAB, (2, 6))
    assert len(fused_groups(model)) == 4
    model.to(torch.float64)
    with torch.no_grad(), fused_projections(model):
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        expected = peft_model(ids.clone()).logits
        with fused_projections(model):
            assert type(model.model.layers[0].self_attn.q_proj).__name__ != "_First"
            fused = peft_model(ids.clone()).logits
    assert {tuple(names) for _, names, _ in fused_groups(model)} == {("gate_proj", "up_proj")}
    torch.testing.assert_close(fused, expected)


def test_compiled_path_with_fused_projections_and_refills_matches_generate_on_the_cpu(monkeypatch):
    """The engine's compiled path (row buckets, refilled slots, the compiled step's in-place
    cache writes) with fused projections, run through torch.compile on the CPU (no graph
    capture there): greedy completions equal HF generate's."""
    import axolotl_gold.rollouts.engines.static as static

    monkeypatch.setattr(static.StaticCacheEngine, "_compiling", lambda self, device: True)
    torch._dynamo.reset()
    model = _model()
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS}, fuse_projections=True, batch_size=3,
                             eos_check_every=4)
    prompts = _prompts() + _prompts(1)
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert fast.refills > 0
