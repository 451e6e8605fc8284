"""The grouped decode attention against HF's own sdpa and eager attention."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from axolotl_gold.rollouts.engines.decode_attention import grouped_decode, grouped_decode_attention


class _Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def _inputs(batch, heads, kv_heads, length, dim=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    # left padding and unfilled cache columns: a ragged boolean mask, each row attends somewhere
    mask = torch.rand(batch, 1, 1, length, generator=g) < 0.6
    mask[..., -1] = True
    return q, k, v, mask


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (14, 2), (8, 1)])
def test_equals_hf_sdpa_with_a_boolean_mask(heads, kv_heads):
    q, k, v, mask = _inputs(3, heads, kv_heads, length=37)
    module = _Module(heads // kv_heads)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    ours = grouped_decode_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3)])
def test_equals_hf_eager_with_an_additive_mask(heads, kv_heads):
    # eager's softmax runs in float32 whatever the inputs: compare in float32
    q, k, v, mask = _inputs(2, heads, kv_heads, length=21, seed=1, dtype=torch.float32)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    module = _Module(heads // kv_heads)
    expected, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.3)
    ours = grouped_decode_attention(q, k, v, additive, 0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_installed_only_inside_the_block_and_only_for_one_token():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )).eval()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with grouped_decode(model):
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
            prefill = model(input_ids=ids).logits  # 7 query tokens: HF's own sdpa serves them
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    torch.testing.assert_close(prefill, full)


def test_half_precision_scores_are_computed_in_float32():
    """bf16 inputs: the output equals attention on the same bf16 values computed in float64
    up to bf16 rounding of the output (scores rounded to bf16 would miss by far more)."""
    q, k, v, mask = _inputs(2, 8, 2, length=64, dim=64, seed=3, dtype=torch.float64)
    q, k, v = (x.mul(3).bfloat16() for x in (q, k, v))
    exact = grouped_decode_attention(q.double(), k.double(), v.double(), mask, 0.125)
    ours = grouped_decode_attention(q, k, v, mask, 0.125).double()
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=2e-2, atol=2e-2)
    assert (ours - exact).abs().max() < 0.05
