"""The sort-free top-p kernels (``rollouts/engines/nucleus.py``) against the tensor version
of the same rule (``sampling.sample_tokens(fused=False)``, itself tied to HF's warpers in
``test_static_engine.py``): on the CPU through Triton's interpreter, on CUDA against a
float64 computation of the nucleus and the CDF."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from axolotl_gold.rollouts.engines import nucleus
from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.sampling import filter_logits, sample_tokens

pytest.importorskip("triton")


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted():
    """``nucleus`` with its kernels run by Triton's interpreter on CPU tensors: only in a
    process started with ``TRITON_INTERPRET=1`` (Triton's own ``tl`` functions are
    decorated when Triton is imported), which ``test_kernels_under_the_interpreter`` starts."""
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 process of test_kernels_under_the_interpreter")
    return nucleus


@pytest.mark.skipif(INTERPRETING, reason="this is the test that starts the interpreted process")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not cuda"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]


def _kernel(module, logits, uniforms, settings, chunk=512):
    if settings.top_k:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return module.nucleus_sample(logits, uniforms, settings.temperature, settings.top_p, chunk=chunk)


@pytest.mark.parametrize(
    "dtype,temperature,top_p,top_k",
    [
        (torch.float32, 0.7, 0.9, 0),
        (torch.float32, 1.0, 0.05, 0),
        (torch.bfloat16, 1.3, 0.5, 40),
        (torch.float16, 1.0, 1.0, 0),
    ],
)
def test_kernels_draw_what_the_tensor_version_draws(interpreted, dtype, temperature, top_p, top_k):
    """Several chunks per row (512 columns each), -inf logits (EOS suppressed), top-k
    first: the same token for every row and uniform."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 2000) * 3).to(dtype)
    logits[0, :7] = float("-inf")
    uniforms = torch.rand(4, dtype=torch.float64)
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
    expected = sample_tokens(logits, settings, uniforms, fused=False)
    assert torch.equal(_kernel(interpreted, logits, uniforms, settings), expected)


def test_ties_at_the_nucleus_floor_stay_whole(interpreted):
    """Four tokens tie where the nucleus ends: all four stay (HF's sort would keep an
    arbitrary part of them), each with the same probability, in both versions."""
    logits = torch.full((1, 64), -4.0)
    logits[0, 10] = 3.0
    logits[0, [20, 30, 40, 50]] = 1.0
    top_p = 0.75  # inside the tied group's mass
    probs = logits.softmax(-1)[0]
    assert probs[10] < top_p < probs[10] + 4 * probs[20]
    settings = SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=top_p)
    grid = 4000
    uniforms = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    tokens = sample_tokens(logits.expand(grid, -1), settings, uniforms, fused=False)
    freq = torch.bincount(tokens, minlength=64).double() / grid
    kept = probs[[10, 20, 30, 40, 50]].double()
    torch.testing.assert_close(freq[[10, 20, 30, 40, 50]], kept / kept.sum(), atol=2 / grid, rtol=0)
    assert freq.sum() == 1 and (freq[[10, 20, 30, 40, 50]] > 0).all()
    few = uniforms[::200]
    assert torch.equal(_kernel(interpreted, logits.expand(few.numel(), -1), few, settings), tokens[::200])


def test_a_row_draws_the_same_token_in_any_batch(interpreted):
    torch.manual_seed(3)
    logits = torch.randn(5, 1500) * 2
    uniforms = torch.rand(5, dtype=torch.float64)
    settings = SamplingSettings(max_new_tokens=1, temperature=0.8, top_p=0.7)
    together = _kernel(interpreted, logits, uniforms, settings)
    alone = torch.cat([_kernel(interpreted, logits[i : i + 1], uniforms[i : i + 1], settings) for i in range(5)])
    assert torch.equal(together, alone)


def test_search_passes_narrow_every_key_range_to_one_key():
    assert nucleus.search_passes(torch.float32) == 8
    assert nucleus.search_passes(torch.bfloat16) == 4
    assert nucleus.search_passes(torch.float16) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels' speed path needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.95), (0.7, 0.5), (1.0, 1.0)])
def test_cuda_kernels_draw_inside_the_float64_nucleus_at_the_float64_cdf(dtype, temperature, top_p):
    """At the real size (16 x 151,936): every token lies in the nucleus and its CDF
    interval (computed in float64 from the same logits) contains ``u`` up to float32
    rounding; the nucleus is HF's (filter_logits) up to ties."""
    torch.manual_seed(0)
    rows, vocab, draws = 16, 151_936, 64
    logits = (torch.randn(rows, vocab, device="cuda") * 4).to(dtype)
    for _ in range(draws // rows):
        uniforms = torch.rand(rows, dtype=torch.float64, device="cuda")
        tokens = nucleus.nucleus_sample(logits, uniforms, temperature, top_p)
        warped = filter_logits(logits.double(), temperature, 0, top_p)
        floor = torch.where(warped > float("-inf"), logits.double(), float("inf")).amin(-1, keepdim=True)
        kept = logits.double() >= floor  # HF's nucleus with ties at its floor kept whole
        probs = torch.where(kept, (logits.double() / temperature).softmax(-1), 0.0)
        cdf = probs.cumsum(-1) / probs.sum(-1, keepdim=True)
        assert kept.gather(1, tokens.view(-1, 1)).all()
        upper = cdf.gather(1, tokens.view(-1, 1)).squeeze(1)
        lower = upper - (probs / probs.sum(-1, keepdim=True)).gather(1, tokens.view(-1, 1)).squeeze(1)
        assert ((lower - 1e-5 <= uniforms) & (uniforms <= upper + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_floor_token_stays_just_above_its_mass_and_goes_just_below(interpreted, dtype):
    """top_p 1e-4 above / below the mass strictly above the 20th most likely token: it is
    drawn at a uniform inside its CDF interval / never drawn (both versions)."""
    torch.manual_seed(5)
    logits = (torch.randn(1, 1500) * 2).to(dtype)
    values, order = logits.double().sort(descending=True)
    probs = values.softmax(-1)
    token, above = order[0, 19], probs[0, :19].sum().item()
    kept = logits.double() >= values[0, 19]
    nucleus_probs = torch.where(kept, logits.double().softmax(-1), 0.0)[0]
    cdf = nucleus_probs.cumsum(0) / nucleus_probs.sum()
    u = (cdf[token] - nucleus_probs[token] / nucleus_probs.sum() / 2).view(1)
    for top_p, drawn in ((above * (1 + 1e-4), True), (above * (1 - 1e-4), False)):
        settings = SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=top_p)
        for got in (_kernel(interpreted, logits, u, settings), sample_tokens(logits, settings, u, fused=False)):
            assert (got.item() == token.item()) == drawn, (top_p, got, token)
