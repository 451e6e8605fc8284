"""StaticCacheEngine with more prompts than slots: a slot whose row stopped starts the next
waiting prompt (``refill_slots``), against HF ``generate``, against one batch after another,
and against the schedule ``benchmarks/ragged.py`` replays from the lengths."""

import sys
from pathlib import Path

import pytest
import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.rollouts.engines.static import StaticCacheEngine
from test_static_engine import EOS, PAD, VOCAB, _model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ragged  # noqa: E402

GREEDY = SamplingSettings(max_new_tokens=30, temperature=0.0)


def _prompts(count=12, seed=0):
    """Prompts of 1 to 11 tokens, the longest ones late (the cache must fit any prompt in
    any slot, not only the first batch's)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 1, 5, 2, 4, 6, 2, 9, 3, 11, 7, 10, 5, 8][:count]
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _ragged_stops(model, prompts):
    """EOS and a second stop token some rows sample early and others late or never."""
    first = HFGenerateEngine(lambda: model, GREEDY, PAD, {EOS}).generate(prompts, seed=0)
    long = [c for c in first if len(c) == GREEDY.max_new_tokens]
    stops = {EOS, long[0][4], long[3][12]}
    lengths = [len(c) for c in HFGenerateEngine(lambda: model, GREEDY, PAD, stops).generate(prompts, seed=0)]
    assert min(lengths) < 8 and max(lengths) == GREEDY.max_new_tokens and len(set(lengths)) > 4, lengths
    return stops


@pytest.mark.parametrize("every", [1, 3, 64])
def test_refilled_slots_match_generate_and_run_fewer_steps(every):
    model = _model()
    prompts = _prompts()
    stops = _ragged_stops(model, prompts)
    expected = HFGenerateEngine(lambda: model, GREEDY, PAD, stops).generate(prompts, seed=0)
    refill = StaticCacheEngine(lambda: model, GREEDY, PAD, stops, batch_size=3, eos_check_every=every)
    chunked = StaticCacheEngine(lambda: model, GREEDY, PAD, stops, batch_size=3, eos_check_every=every,
                                refill_slots=False)
    assert refill.generate(prompts, seed=0) == expected
    assert chunked.generate(prompts, seed=0) == expected
    assert refill.refills >= 6 and chunked.refills == 0
    if every < GREEDY.max_new_tokens:  # else checks come only at rows' last tokens: no gain
        assert refill.token_steps < chunked.token_steps, (refill.token_steps, chunked.token_steps)
    assert refill.token_steps <= chunked.token_steps


@pytest.mark.parametrize("compiled", [False, True])
def test_engine_runs_the_schedule_ragged_py_replays(compiled, monkeypatch):
    """The engine's decode steps and row-steps are the replay's for the lengths it produced:
    refilled, one batch after another, and (compiled bookkeeping, run eagerly) in buckets."""
    import axolotl_gold.rollouts.engines.slots as slots

    if compiled:
        monkeypatch.setattr(StaticCacheEngine, "_compiling", lambda self, device: True)
        monkeypatch.setattr(slots, "COMPILE_MIN_ROWS", 2)
    model = _model()
    prompts = _prompts(14, seed=1)
    stops = _ragged_stops(model, prompts)
    for refill, kind in ((True, "static-compiled" if compiled else "static"), (False, "static-chunked")):
        if compiled and not refill:
            continue  # the chunked replay knows the eager compaction only
        engine = StaticCacheEngine(lambda: model, GREEDY, PAD, stops, batch_size=5, eos_check_every=2,
                                   refill_slots=refill)
        lengths = [len(c) for c in engine.generate(prompts, seed=0)]
        replayed = ragged.engine_schedule(lengths, GREEDY.max_new_tokens, kind, slots=5, every=2)
        assert (engine.token_steps, engine.row_steps) == replayed, (kind, lengths)
        assert engine.compactions >= 1


def test_compiled_slots_that_fit_round_down_to_a_power_of_two(monkeypatch):
    """Compiled, the rows that fit (free memory: a different count call to call) round down
    to a power of two, so the decode step compiles for few row counts."""
    import axolotl_gold.rollouts.engines.static as static

    monkeypatch.setattr(StaticCacheEngine, "_compiling", lambda self, device: True)
    model = _model()
    prompts = _prompts()
    engine = StaticCacheEngine(lambda: model, GREEDY, PAD, {EOS}, eos_check_every=4)
    for fit in (7, 6, 5):
        monkeypatch.setattr(static, "rows_that_fit", lambda *args, fit=fit: fit)
        engine.generate(prompts, seed=0)
    assert {key[1] for key in engine._steps} <= {4, 2}  # 4 slots, compacted buckets below
    monkeypatch.setattr(static, "rows_that_fit", lambda *args: len(prompts))
    engine.generate(prompts, seed=0)
    assert len(prompts) in {key[1] for key in engine._steps}  # all fit: one batch as it is


def test_stopped_slots_never_pass_the_positions_generate_uses():
    """A slot whose row stopped keeps stepping until it is refilled or the call ends; were
    its positions to keep growing past what generate reaches, HF's dynamic / long RoPE
    (rescaled for the whole batch by its largest position once past
    ``max_position_embeddings``) would change every live row's rotations."""
    model = _model()
    prompts = _prompts()
    stops = _ragged_stops(model, prompts)
    seen = []
    model.model.rotary_emb.register_forward_pre_hook(lambda module, args: seen.append(int(args[1].max())))
    expected = HFGenerateEngine(lambda: model, GREEDY, PAD, stops).generate(prompts, seed=0)
    reached = max(seen)
    assert reached == max(map(len, prompts)) + GREEDY.max_new_tokens - 2  # token max_new - 1 is not fed
    seen.clear()
    engine = StaticCacheEngine(lambda: model, GREEDY, PAD, stops, batch_size=3, eos_check_every=1,
                               compact_finished=False)
    assert engine.generate(prompts, seed=0) == expected
    assert engine.refills >= 6 and max(seen) <= reached, (max(seen), reached)


def test_samples_do_not_depend_on_slots_or_refills():
    """Each prompt's noise is (seed, prompt index, token): refilled slots, one batch after
    another and all rows at once sample the same completions."""
    model = _model()
    model.lm_head.weight.data.div_(40.0)
    prompts = _prompts()
    stops = {EOS, *range(10, 16)}
    settings = SamplingSettings(max_new_tokens=20, temperature=1.0, top_p=0.9)
    runs = [
        StaticCacheEngine(lambda: model, settings, PAD, stops, eos_check_every=2, **kwargs).generate(prompts, seed=4)
        for kwargs in ({}, {"batch_size": 4}, {"batch_size": 4, "refill_slots": False}, {"batch_size": 1})
    ]
    assert len({len(c) for c in runs[0]}) > 3, runs[0]
    assert all(run == runs[0] for run in runs[1:])


def test_one_token_completions_and_no_stop_ids():
    model = _model()
    prompts = _prompts(8)
    one = SamplingSettings(max_new_tokens=1, temperature=0.0)
    expected = HFGenerateEngine(lambda: model, one, PAD, {EOS}).generate(prompts, seed=0)
    engine = StaticCacheEngine(lambda: model, one, PAD, {EOS}, batch_size=3)
    assert engine.generate(prompts, seed=0) == expected and engine.token_steps == 0
    # no stop ids: every row runs to its last token; checks only there
    six = SamplingSettings(max_new_tokens=6, temperature=0.0)
    expected = HFGenerateEngine(lambda: model, six, PAD, set()).generate(prompts, seed=0)
    engine = StaticCacheEngine(lambda: model, six, PAD, set(), batch_size=3)
    assert engine.generate(prompts, seed=0) == expected
    assert all(len(c) == 6 for c in expected)
    assert engine.token_steps == 3 * 5  # three rounds of 5 decode steps (8 prompts, 3 slots)


def test_first_prompts_prefill_into_the_step_cache_and_refills_into_their_own(monkeypatch):
    """No second cache when every slot starts at once (its prompt keys and values would
    sit beside the whole decode cache); a refill prefills its few rows apart."""
    import axolotl_gold.rollouts.engines.decode_step as decode_step

    built = []
    real = decode_step.static_cache
    monkeypatch.setattr(decode_step, "static_cache", lambda config, columns: built.append(columns) or real(config, columns))
    model = _model()
    prompts = _prompts()
    StaticCacheEngine(lambda: model, GREEDY, PAD, {EOS}).generate(prompts, seed=0)
    assert built == [max(map(len, prompts)) + GREEDY.max_new_tokens]  # the decode step's own only
    built.clear()
    stops = _ragged_stops(model, prompts)
    engine = StaticCacheEngine(lambda: model, GREEDY, PAD, stops, batch_size=3, eos_check_every=2)
    engine.generate(prompts, seed=0)
    assert len(built) > 1 and engine.refills >= 6
    assert all(width <= max(map(len, prompts)) for width in built[1:])  # prompt-wide, for refills


def test_min_new_tokens_holds_in_refilled_slots():
    model = _model()
    prompts = _prompts(7)
    forced = SamplingSettings(max_new_tokens=12, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, forced, PAD, {EOS}, min_new_tokens=12)
    engine = StaticCacheEngine(lambda: model, forced, PAD, {EOS}, batch_size=2, min_new_tokens=12)
    out = engine.generate(prompts, seed=0)
    assert out == hf.generate(prompts, seed=0)
    assert all(len(c) == 12 and EOS not in c for c in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode step needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_refills_reuse_the_captured_graph(compiled):
    """A refill rewrites the slot's buffers in place: one graph serves the call until a
    compaction (plain and through torch.compile)."""
    model = _model("cuda")
    prompts = _prompts()
    stops = _ragged_stops(model, prompts)
    expected = HFGenerateEngine(lambda: model, GREEDY, PAD, stops).generate(prompts, seed=0)
    engine = StaticCacheEngine(lambda: model, GREEDY, PAD, stops, batch_size=4, eos_check_every=2,
                               compact_finished=compiled, compile_decode=compiled)
    assert engine.generate(prompts, seed=0) == expected
    assert engine.refills >= 6 and engine.graphs_captured == 1 + engine.compactions
