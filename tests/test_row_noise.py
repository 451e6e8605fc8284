"""Row-owned sampling noise: Exp(1) draws that depend on (seed, row, step, token) only."""

import math

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.noise import exponential_noise, mix64, row_seeds
from axolotl_gold.rollouts.engines.static import StaticCacheEngine

from test_static_engine import EOS, PAD, _model, _prompts


def test_draws_are_exponential_and_uncorrelated():
    seeds = row_seeds(3, torch.arange(8))
    e = torch.cat([exponential_noise(seeds, step, 4096) for step in range(4)]).double()
    n = e.numel()
    assert e.min() > 0 and torch.isfinite(e).all()
    # mean 1, variance 1, P(E > 1) = 1/e, within 5 standard errors of n = 131k draws
    assert abs(e.mean() - 1) < 5 / math.sqrt(n)
    assert abs(e.var() - 1) < 5 * math.sqrt(8 / n)
    assert abs((e > 1).double().mean() - math.exp(-1)) < 5 * math.sqrt(0.25 / n)
    # neighbouring tokens, rows and steps are not correlated
    flat = e.view(4, 8, 4096)
    for a, b in ((flat[:, :, 1:], flat[:, :, :-1]), (flat[:, 1:], flat[:, :-1]), (flat[1:], flat[:-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_a_rows_draws_do_not_depend_on_its_batch():
    all_rows = row_seeds(11, torch.arange(6))
    some = row_seeds(11, torch.tensor([4, 1]))
    torch.testing.assert_close(exponential_noise(some, 7, 50), exponential_noise(all_rows, 7, 50)[[4, 1]])
    assert not torch.equal(exponential_noise(all_rows, 7, 50), exponential_noise(row_seeds(12, torch.arange(6)), 7, 50))


def test_mix64_is_a_bijection_on_a_sample():
    x = torch.arange(-50000, 50000, dtype=torch.long) * 7919
    assert mix64(x).unique().numel() == x.numel()


def test_samples_are_the_same_whatever_the_chunking_and_compaction():
    model = _model()
    model.lm_head.weight.data.div_(40.0)  # flat distributions: sampling matters
    settings = SamplingSettings(max_new_tokens=20, temperature=1.0, top_p=0.9)
    prompts = _prompts(1) + _prompts(2)
    stops = {EOS, *range(10, 20)}  # rows stop at very different steps
    whole = StaticCacheEngine(lambda: model, settings, PAD, stops, compact_finished=False)
    reference = whole.generate(prompts, seed=4)
    assert len({len(c) for c in reference}) > 2, reference
    for kwargs in ({"batch_size": 3}, {"batch_size": 1}, {"eos_check_every": 1}):
        engine = StaticCacheEngine(lambda: model, settings, PAD, stops, **kwargs)
        assert engine.generate(prompts, seed=4) == reference, kwargs
        assert engine.compactions >= ("eos_check_every" in kwargs), kwargs
    assert whole.generate(prompts, seed=5) != reference
