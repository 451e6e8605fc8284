"""The Triton decode attention (``rollouts/engines/decode_kernel.py``) against the tensor
version (``decode_attention.grouped_decode_attention``, itself tied to HF's sdpa / eager
attention in test_decode_attention.py): on the CPU through Triton's interpreter, on CUDA
directly; and the static engine with the kernel in its decode step against HF ``generate``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from axolotl_gold.rollouts.engines import decode_kernel
from axolotl_gold.rollouts.engines.decode_attention import grouped_decode_attention

pytest.importorskip("triton")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETING else (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.skipif(INTERPRETING, reason="this is the test that starts the interpreted process")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]


def _inputs(batch, heads, kv_heads, length, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # HF hands attention queries transposed from [B, 1, H, D]: not contiguous
    q = torch.randn(batch, 1, heads, dim, generator=g).transpose(1, 2)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    # rows of different left padding and a cache filled to different depths
    mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool)
    for row in range(batch):
        pad = int(torch.randint(0, length // 2, (1,), generator=g))
        filled = int(torch.randint(pad + 1, length + 1, (1,), generator=g))
        mask[row, ..., pad:filled] = torch.rand(filled - pad, generator=g) < 0.9
        mask[row, ..., filled - 1] = True
    return (*(x.to(device=device, dtype=dtype) for x in (q, k, v)), mask.to(device))


def _reference(q, k, v, mask, scale):
    """The tensor version on the same values in float64 (what both approximate)."""
    return grouped_decode_attention(q.double(), k.double(), v.double(), mask, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch,heads,kv_heads,length,dim,dtype",
    [
        (3, 14, 2, 300, 64, torch.float32),  # Qwen2.5-0.5B's grouping, several splits
        (2, 15, 5, 1100, 64, torch.bfloat16),  # SmolLM2-360M's, splits of several blocks
        (2, 4, 4, 70, 80, torch.float16),  # no grouping, a head size that is not a power of two
        (2, 8, 1, 40, 32, torch.float32),  # multi-query, one partial block
    ],
)
def test_matches_the_tensor_version(device, batch, heads, kv_heads, length, dim, dtype):
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, dim, dtype, device)
    scale = dim ** -0.5
    ours = decode_kernel.flash_decode(q, k, v, mask, scale)
    tensor = grouped_decode_attention(q, k, v, mask, scale)
    assert ours.shape == tensor.shape == (batch, 1, heads, dim) and ours.dtype == v.dtype
    exact = _reference(q, k, v, mask, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        # both round the output to the values' dtype. The tensor version also rounds its
        # probabilities to the values' dtype; on CUDA the kernel rounds them to TF32's 10
        # bits: closer than bf16's 8 (so at least as close to the exact value), as close as
        # fp16's 10 (the same error class, other roundings). Triton's interpreter truncates
        # float32 to bf16 where the GPU rounds to nearest: there only the bound of one unit
        # in the last place holds.
        ulp = torch.finfo(dtype).eps
        assert (ours.double() - exact).abs().max() <= 2 * ulp * exact.abs().max()
        if not (INTERPRETING and dtype == torch.bfloat16):
            slack = 1.05 if dtype == torch.bfloat16 else 1.25
            assert (ours.double() - exact).abs().mean() <= (tensor.double() - exact).abs().mean() * slack


@pytest.mark.parametrize("device", DEVICES)
def test_masked_columns_are_never_read(device):
    """NaN in every column the mask excludes (left padding, the unfilled cache): a read of
    any of them would reach the output."""
    q, k, v, mask = _inputs(4, 6, 2, 260, 16, torch.float32, device, seed=1)
    clean = decode_kernel.flash_decode(q, k, v, mask, 0.25)
    hidden = ~mask.reshape(4, 1, 260, 1).expand_as(k)
    poisoned = decode_kernel.flash_decode(q, k.masked_fill(hidden, float("nan")),
                                          v.masked_fill(hidden, float("nan")), mask, 0.25)
    assert torch.equal(poisoned, clean)
    torch.testing.assert_close(clean.double(), _reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_broadcast_over_rows_no_mask_and_a_row_with_nothing_to_attend(device):
    q, k, v, _ = _inputs(3, 4, 2, 100, 16, torch.float32, device, seed=2)
    shared = torch.zeros(1, 1, 1, 100, dtype=torch.bool, device=device)
    shared[..., 10:77] = True
    ours = decode_kernel.flash_decode(q, k, v, shared, 0.3)
    torch.testing.assert_close(ours.double(), _reference(q, k, v, shared, 0.3), rtol=1e-5, atol=1e-5)
    everything = decode_kernel.flash_decode(q, k, v, None, 0.3)
    torch.testing.assert_close(everything.double(), _reference(q, k, v, None, 0.3), rtol=1e-5, atol=1e-5)
    nothing = shared.expand(3, 1, 1, 100).clone()
    nothing[1] = False
    out = decode_kernel.flash_decode(q, k, v, nothing, 0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the tensor version gives NaN here
    torch.testing.assert_close(out[0], ours[0])


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_alone_equals_the_row_in_a_batch(device):
    q, k, v, mask = _inputs(5, 14, 2, 500, 64, torch.bfloat16, device, seed=3)
    batch = decode_kernel.flash_decode(q, k, v, mask, 0.125)
    alone = decode_kernel.flash_decode(q[3:4], k[3:4], v[3:4], mask[3:4], 0.125)
    assert torch.equal(alone[0], batch[3])


def test_served_inputs():
    q = torch.zeros(1, 4, 1, 8)
    k = torch.zeros(1, 2, 10, 8)
    boolean, additive = torch.ones(1, 1, 1, 10, dtype=torch.bool), torch.zeros(1, 1, 1, 10)
    on = INTERPRETING
    assert decode_kernel.available(q, k, boolean) is on and decode_kernel.available(q, k, None) is on
    assert not decode_kernel.available(q, k, additive)  # eager's masks: the tensor version
    assert not decode_kernel.available(torch.zeros(1, 4, 3, 8), k, boolean)  # not one token
    assert decode_kernel.split_columns(1024) == 64 and decode_kernel.split_columns(4096) == 256
    assert decode_kernel.split_columns(40) == 64


@pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="torch.compile of Triton calls needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_torch_compile_equals_the_eager_call(dtype):
    """Inductor hands a Python float to the kernel as float64 (it once reached tl.dot so)."""
    q, k, v, mask = _inputs(4, 14, 2, 300, 64, dtype, "cuda", seed=4)
    compiled = torch.compile(lambda q, k, v, mask: decode_kernel.flash_decode(q, k, v, mask, 0.125), dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, mask), decode_kernel.flash_decode(q, k, v, mask, 0.125),
                               rtol=0, atol=0)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_static_engine_with_the_kernel_matches_generate(device, compiled, monkeypatch):
    """Greedy output of the static engine, the kernel serving its decode steps (eager, or
    compiled and captured on CUDA), equals HF ``generate`` (and the kernel did serve them)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine

    if compiled and device != "cuda":
        pytest.skip("torch.compile of the decode step is CUDA-only")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).to(device).eval()
    model.lm_head.weight.data.mul_(40.0)  # greedy choices far from ties
    calls = []
    real = decode_kernel.flash_decode
    monkeypatch.setattr(decode_kernel, "flash_decode", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 1, 7)]
    greedy = SamplingSettings(max_new_tokens=20, temperature=0.0)
    expected = HFGenerateEngine(lambda: model, greedy, 0, {1}).generate(prompts, seed=0)
    engine = StaticCacheEngine(lambda: model, greedy, 0, {1}, use_cuda_graph=compiled, compile_decode=compiled)
    assert engine.generate(prompts, seed=0) == expected
    assert calls and len(calls) % 2 == 0  # both layers of each decode step (traced once when compiled)
