"""Row-owned sampling noise: U(0, 1) draws that depend on (seed, row, step) only."""

import math

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.noise import mix64, row_seeds, row_uniforms
from axolotl_gold.rollouts.engines.static import StaticCacheEngine

from test_static_engine import EOS, PAD, _model, _prompts


def test_draws_are_uniform_and_uncorrelated():
    seeds = row_seeds(3, torch.arange(4096))
    u = torch.stack([row_uniforms(seeds, step) for step in range(32)])  # [steps, rows]
    n = u.numel()
    assert u.min() > 0 and u.max() < 1
    # mean 1/2, variance 1/12, and every tenth of (0, 1) a tenth of the draws (5 standard errors)
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    deciles = torch.bincount((u * 10).long().flatten(), minlength=10).double() / n
    assert (deciles - 0.1).abs().max() < 5 * math.sqrt(0.09 / n)
    # neighbouring rows and steps are not correlated
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_a_rows_draws_do_not_depend_on_its_batch():
    all_rows = row_seeds(11, torch.arange(6))
    some = row_seeds(11, torch.tensor([4, 1]))
    torch.testing.assert_close(row_uniforms(some, 7), row_uniforms(all_rows, 7)[[4, 1]])
    assert not torch.equal(row_uniforms(all_rows, 7), row_uniforms(row_seeds(12, torch.arange(6)), 7))
    assert not torch.equal(row_uniforms(all_rows, 7), row_uniforms(all_rows, 8))


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
