"""StaticCacheEngine against model.generate, and its sampling helpers against HF's warpers."""

import pytest
import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.static import StaticCacheEngine, filter_logits, sample_tokens
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine

VOCAB, PAD, EOS = 97, 0, 1


def _model(device="cpu", dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    # a peaked output layer, so that greedy choices are far from ties and EOS shows up
    model.lm_head.weight.data.mul_(40.0)
    return model


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 1, 7]  # different lengths: left padding in the batch
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _engines(model, max_new, **fast_kwargs):
    greedy = SamplingSettings(max_new_tokens=max_new, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS}, **fast_kwargs)
    return hf, fast


@pytest.mark.parametrize("eos_check_every", [1, 4, 64])
def test_greedy_matches_generate(eos_check_every):
    model = _model()
    hf, fast = _engines(model, max_new=24, eos_check_every=eos_check_every)
    prompts = _prompts()
    assert fast.generate(prompts, seed=1) == hf.generate(prompts, seed=1)
    assert fast.calls == 1


def test_greedy_matches_generate_with_batch_size_and_eos_mid_completion():
    model = _model()
    hf, fast = _engines(model, max_new=40, batch_size=3)
    hf.batch_size = 3
    prompts = _prompts(1) + _prompts(2)
    expected = hf.generate(prompts, seed=0)
    assert fast.generate(prompts, seed=0) == expected
    assert all(len(c) <= 40 for c in expected)


def test_min_new_tokens_forces_full_length_and_matches_generate():
    model = _model()
    greedy = SamplingSettings(max_new_tokens=20, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS}, min_new_tokens=20)
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS}, min_new_tokens=20)
    prompts = _prompts()
    out = fast.generate(prompts, seed=0)
    assert out == hf.generate(prompts, seed=0)
    assert all(len(c) == 20 and EOS not in c for c in out)


def test_sampling_is_seeded_and_completions_are_trimmed():
    model = _model()
    settings = SamplingSettings(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=20)
    fast = StaticCacheEngine(lambda: model, settings, PAD, {EOS}, eos_check_every=4)
    prompts = _prompts()
    first, again, other = (fast.generate(prompts, seed=s) for s in (3, 3, 4))
    assert first == again
    assert first != other
    for completion in first:
        assert 0 < len(completion) <= 16
        assert EOS not in completion[:-1]
        assert PAD not in completion


def test_empty_prompt_list():
    model = _model()
    _, fast = _engines(model, max_new=4)
    assert fast.generate([], seed=0) == []
    assert fast.calls == 1


def test_filter_logits_matches_hf_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.9, 7, 0.5)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = filter_logits(logits.clone(), temperature, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = ~torch.isinf(got)
        torch.testing.assert_close(got[finite], expected[finite])


def test_sample_tokens_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).repeat(20000, 1)
    settings = SamplingSettings(max_new_tokens=1, temperature=1.0)
    tokens = sample_tokens(logits, settings, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.9, 7, 0.5), (0.5, 0, 0.3)]
)
def test_inverse_cdf_sampling_is_the_warped_distribution(temperature, top_k, top_p, dtype):
    """Uniforms on a fine grid through sample_tokens give each token exactly the
    probability HF's warpers (filter_logits, checked above) give it, and never a token
    they remove."""
    torch.manual_seed(1)
    logits = (torch.randn(1, 50) * 2).to(dtype)  # bf16: as a bf16 model returns them
    grid = 200_000
    uniforms = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sample_tokens(logits.expand(grid, -1), settings, uniforms)
    freq = torch.bincount(tokens, minlength=50).double() / grid
    expected = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)[0].double()
    assert (freq[expected == 0] == 0).all()
    torch.testing.assert_close(freq, expected, atol=2 / grid, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode step needs a CUDA device")
def test_cuda_graph_greedy_matches_generate():
    model = _model("cuda")
    hf, fast = _engines(model, max_new=24, eos_check_every=8)
    prompts = _prompts()
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert fast.graphs_captured == 1


def test_bucketed_buffers_of_the_compiled_path_match_generate(monkeypatch):
    """The compiled path's bookkeeping (rounded cache columns, power-of-two row buckets
    padded with stopped rows, buffers kept between calls), run eagerly on the CPU."""
    import axolotl_gold.rollouts.engines.slots as slots
    import axolotl_gold.rollouts.engines.static as static

    monkeypatch.setattr(static.StaticCacheEngine, "_compiling", lambda self, device: True)
    monkeypatch.setattr(slots, "COMPILE_MIN_ROWS", 2)
    model = _model()
    prompts = [p for seed in (1, 2, 3, 4) for p in _prompts(seed)][:13]  # buckets 13 -> 8 -> 4 -> 2
    first, _ = _engines(model, max_new=40)
    # second stop tokens that rows sample at very different steps
    long = [c for c in first.generate(prompts, seed=0) if len(c) > 20]
    stops = {EOS, *(c[k] for c, k in zip(long, (3, 9, 20)))}
    greedy = SamplingSettings(max_new_tokens=40, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, stops)
    fast = StaticCacheEngine(lambda: model, greedy, PAD, stops, eos_check_every=2)
    expected = hf.generate(prompts, seed=0)
    assert len({len(c) for c in expected}) > 3, expected
    assert fast.generate(prompts, seed=0) == expected
    assert fast.compactions >= 2
    assert {k[2] for k in fast._steps} == {static.COMPILE_COLUMNS}
    kept = dict(fast._steps)
    assert fast.generate(prompts, seed=0) == expected
    assert all(fast._steps[k] is v for k, v in kept.items())  # the same buffers again
    sampled = SamplingSettings(max_new_tokens=24, temperature=1.0, top_p=0.9)
    model.lm_head.weight.data.div_(40.0)
    bucketed = StaticCacheEngine(lambda: model, sampled, PAD, {EOS, *range(10, 20)}, eos_check_every=2)
    monkeypatch.undo()
    plain = StaticCacheEngine(lambda: model, sampled, PAD, {EOS, *range(10, 20)}, eos_check_every=2)
    monkeypatch.setattr(static.StaticCacheEngine, "_compiling", lambda self, device: True)
    assert bucketed.generate(prompts, seed=3) == plain.generate(prompts, seed=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the decode step is CUDA-only")
def test_compiled_decode_greedy_matches_generate_and_compiles_once_per_bucket():
    from torch._dynamo.utils import counters

    model = _model("cuda")
    hf, fast = _engines(model, max_new=24, eos_check_every=4, compile_decode=True)
    prompts = _prompts() * 3  # 12 rows: stops at different steps, so compaction to a bucket
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    buckets, graphs = set(fast._steps), counters["stats"]["unique_graphs"]
    assert {k[1] for k in buckets} >= {12}
    # other prompt widths round up to the same cache columns: no new bucket, no recompile
    other = [p[:-1] or p for p in prompts]
    assert fast.generate(other, seed=0) == hf.generate(other, seed=0)
    assert set(fast._steps) == buckets or {k[1:] for k in fast._steps} == {k[1:] for k in buckets}
    assert counters["stats"]["unique_graphs"] == graphs


def _under_accelerate_autocast(model, cpu=True):
    """The student as Accelerate runs it for `bf16: true`: float32 weights, forward in autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton
    return Accelerator(mixed_precision="bf16", cpu=cpu).prepare_model(model)


def test_float32_student_under_autocast_runs_and_matches_generate():
    # was: index_copy_(): self and source expected to have the same dtype (RoPE keeps
    # keys in float32, values come out of the projection in bfloat16)
    model = _under_accelerate_autocast(_model())
    # HF's own attention kernel: bitwise the same bf16 numerics as generate()
    hf, fast = _engines(model, max_new=16, grouped_attention=False)
    prompts = _prompts()
    expected = hf.generate(prompts, seed=0)
    assert fast.generate(prompts, seed=0) == expected
    assert fast.fallbacks == 0
    _agrees_in_low_precision(StaticCacheEngine(lambda: model, fast.sampling, PAD, {EOS}), prompts, expected)


def _axolotl_full_fine_tune_layout(tie: bool):
    """bf16 body, float32 embeddings and head (Axolotl's `_configure_embedding_dtypes`),
    forward in Accelerate's bf16 autocast."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.lm_head.weight.data.mul_(40.0)
    model.model.embed_tokens.float()
    model.lm_head.float()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    return _under_accelerate_autocast(model)


@pytest.mark.parametrize("tie", [True, False])
def test_float32_head_under_autocast_is_cast_once_per_call_with_the_same_output(tie, monkeypatch):
    """The decode steps read a bf16 copy of the float32 head made once per call, not
    autocast's cast per step; the tokens are generate()'s (same rounding), and the head's
    parameters (tied or not) are the model's again afterwards."""
    model = _axolotl_full_fine_tune_layout(tie)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    hf, fast = _engines(model, max_new=16, grouped_attention=False)
    prompts = _prompts()
    expected = hf.generate(prompts, seed=0)
    seen.clear()
    assert fast.generate(prompts, seed=0) == expected
    assert seen[0] == torch.float32 and set(seen[1:]) == {torch.bfloat16} and len(seen) > 2, seen
    assert model.lm_head.weight is head and model.model.embed_tokens.weight is embed
    assert head.dtype == torch.float32 and head.requires_grad
    # without autocast (a float32 model): nothing is swapped
    plain = _model()
    seen.clear()
    plain.lm_head.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    _engines(plain, max_new=8)[1].generate(prompts, seed=0)
    assert set(seen) == {torch.float32}


def test_compiled_step_with_the_cast_head_is_not_recompiled_per_call(monkeypatch):
    """The head's copy is a new tensor every call: the compiled decode step (run here on
    the CPU, uncaptured) takes it as an input, not a constant, so the second call compiles
    nothing."""
    from torch._dynamo.utils import counters

    import axolotl_gold.rollouts.engines.static as static

    monkeypatch.setattr(static.StaticCacheEngine, "_compiling", lambda self, device: True)
    model = _axolotl_full_fine_tune_layout(True)
    hf, fast = _engines(model, max_new=12, grouped_attention=False)
    prompts = _prompts()
    expected = hf.generate(prompts, seed=0)
    assert fast.generate(prompts, seed=0) == expected
    graphs = counters["stats"]["unique_graphs"]
    assert fast.generate(prompts, seed=0) == expected
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_decode_step_is_shared_by_same_shape_steps_and_compiles_past_dynamos_limit():
    """Two caches of one shape share a compiled step (the cache's layer class is made once:
    a class per cache recompiled every new one), and a new shape compiles even past
    dynamo's recompile limit (past it dynamo would run the shape eagerly), here set to 1."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from axolotl_gold.rollouts.engines.decode_step import CompiledStep, DecodeStep

    # dynamo's own config patch: monkeypatch.setattr's undo left the key unreadable to the
    # compiled tests that ran after this one in the same process
    with dynamo_config.patch(recompile_limit=1):
        model = _model()
        torch._dynamo.reset()

        def step(rows: int, total: int) -> torch.Tensor:
            ids = torch.randint(3, VOCAB, (rows, 5), generator=torch.Generator().manual_seed(rows))
            mask = torch.ones_like(ids)
            decode = DecodeStep(model, rows, total, "cpu")
            decode.reset()
            with torch.no_grad():
                decode.prefill(ids, mask)
                compiled = CompiledStep(decode)()
                decode.steps.zero_()
                eager = decode()
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
            return counters["stats"]["unique_graphs"]

        first = step(4, 64)
        assert step(4, 64) == first  # the same shape: no recompile
        assert step(2, 128) == first + 1  # a new shape past the limit of 1: compiled, not eager


def _agrees_in_low_precision(engine, prompts, expected, prefix=8):
    """The grouped decode attention computes bf16 attention with other kernels than HF's
    (float32 scores), so a near-tie may later go the other way; the first tokens agree."""
    got = engine.generate(prompts, seed=0)
    assert [g[:prefix] for g in got] == [e[:prefix] for e in expected]


def test_eager_attention_gets_an_additive_mask():
    # eager attention adds the 4-D mask to its scores: a boolean mask was silently wrong
    model = _model()
    model.config._attn_implementation = "eager"
    hf, fast = _engines(model, max_new=24)
    prompts = _prompts()
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert fast.fallbacks == 0


def _sliding_model(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, sliding_window=window,
    )
    model = MistralForCausalLM(cfg).eval()
    model.lm_head.weight.data.mul_(40.0)
    return model


@pytest.mark.parametrize("window,served", [(4, False), (64, True)])
def test_sliding_window_model(window, served):
    # a window narrower than prompt + completion: HF generate serves it (it crashed in the
    # decode step); a window wider than the sequence is full attention, served statically
    model = _sliding_model(window)
    hf, fast = _engines(model, max_new=12)
    prompts = _prompts()
    assert fast.generate(prompts, seed=0) == hf.generate(prompts, seed=0)
    assert fast.fallbacks == (0 if served else 1)
    assert fast.calls == 1


def test_unserved_attention_falls_back_to_generate():
    model = _model()
    model.config._attn_implementation = "flex_attention"
    from axolotl_gold.rollouts.engines.static_support import blocker

    assert "flex_attention" in blocker(model, 10)
    model.config._attn_implementation = "sdpa"
    assert blocker(model, 10) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode step needs a CUDA device")
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cuda_graph_float32_student_under_autocast(attention):
    # what `axolotl train` runs with `bf16: true` and a full fine-tune: float32 weights,
    # Accelerate's autocast around the forward, the decode step captured as a CUDA graph
    model = _model("cuda")
    model.config._attn_implementation = attention
    model = _under_accelerate_autocast(model, cpu=False)
    hf, fast = _engines(model, max_new=24, eos_check_every=8, grouped_attention=False)
    prompts = _prompts()
    expected = hf.generate(prompts, seed=0)
    assert fast.generate(prompts, seed=0) == expected
    assert fast.graphs_captured == 1 and fast.fallbacks == 0
    _agrees_in_low_precision(
        StaticCacheEngine(lambda: model, fast.sampling, PAD, {EOS}, eos_check_every=8), prompts, expected
    )


def test_rows_that_stopped_are_dropped_and_greedy_still_matches_generate():
    model = _model()
    prompts = _prompts(1) + _prompts(2) + _prompts(3)
    hf, _ = _engines(model, max_new=40)
    # a second stop token that half the rows sample early and the rest late or never
    stops = {EOS, hf.generate(prompts, seed=0)[0][5]}
    greedy = SamplingSettings(max_new_tokens=40, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, stops)
    fast = StaticCacheEngine(lambda: model, greedy, PAD, stops, eos_check_every=2)
    expected = hf.generate(prompts, seed=0)
    lengths = sorted(len(c) for c in expected)
    assert lengths[len(lengths) // 2] < lengths[-1] - 4, lengths  # ragged: the case under test
    assert fast.generate(prompts, seed=0) == expected
    assert fast.compactions >= 1


def test_compaction_keeps_sampling_seeded():
    model = _model()
    settings = SamplingSettings(max_new_tokens=30, temperature=1.0)
    fast = StaticCacheEngine(lambda: model, settings, PAD, {EOS}, eos_check_every=2)
    prompts = _prompts(1) + _prompts(2)
    first = fast.generate(prompts, seed=5)
    assert fast.generate(prompts, seed=5) == first
    assert all(len(c) <= 30 and (EOS not in c or c.index(EOS) == len(c) - 1) for c in first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_bound_splits_the_call_with_the_same_samples(monkeypatch):
    """With little free memory the rows go in chunks; the samples are the unbounded call's,
    and the CUDA graph + row noise give the CPU's samples too."""
    import axolotl_gold.rollouts.engines.static as static

    model = _model("cuda")
    model.lm_head.weight.data.div_(40.0)
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, top_p=0.9)
    prompts = _prompts(1) + _prompts(2)
    unbounded = StaticCacheEngine(lambda: model, settings, PAD, {EOS}).generate(prompts, seed=2)
    assert static.rows_that_fit(model, len(prompts), 32) == len(prompts)
    monkeypatch.setattr(static, "FREE_MEMORY_SHARE", 1e-9)
    assert static.rows_that_fit(model, len(prompts), 32) == 1
    assert StaticCacheEngine(lambda: model, settings, PAD, {EOS}).generate(prompts, seed=2) == unbounded
    cpu = _model("cpu")
    cpu.lm_head.weight.data.div_(40.0)
    on_cpu = StaticCacheEngine(lambda: cpu, settings, PAD, {EOS}).generate(prompts, seed=2)
    same = sum(a == b for a, b in zip(on_cpu, unbounded))
    assert same >= len(prompts) - 1, (on_cpu, unbounded)  # float rounding may flip one row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_with_many_stop_ids_samples_as_the_cpu():
    """40 stop ids (torch.isin sorts and syncs from 15 on with 16 rows, which broke the
    capture): rows stop at any of them, compaction runs, and the samples are the CPU's."""
    stops = {EOS, *range(50, 89)}
    settings = SamplingSettings(max_new_tokens=40, temperature=1.0, top_p=0.9)
    prompts = [p for seed in range(1, 9) for p in _prompts(seed)][:16]
    samples, engines = {}, {}
    for device in ("cuda", "cpu"):
        model = _model(device)
        model.lm_head.weight.data.div_(40.0)
        engines[device] = StaticCacheEngine(lambda m=model: m, settings, PAD, stops, eos_check_every=2)
        samples[device] = engines[device].generate(prompts, seed=3)
    lengths = [len(c) for c in samples["cuda"]]
    assert min(lengths) < 40 and engines["cuda"].compactions >= 1 and engines["cuda"].graphs_captured >= 2, lengths
    assert all(c[-1] in stops or len(c) == 40 for c in samples["cuda"])
    same = sum(a == b for a, b in zip(samples["cpu"], samples["cuda"]))
    assert same >= len(prompts) - 2, samples  # float rounding may flip a row or two


def test_the_compiled_decode_step_writes_the_cache_in_place(monkeypatch):
    """Inductor keeps each layer's per-row key / value write in place: after its reinplacing
    pass the step's graph copies no whole cache layer back into its buffer. (A ``scatter_``
    write was functionalized to an out-of-place scatter plus such a copy: every layer's
    whole cache read and written twice a token step.) The step still equals the eager one."""
    import torch._inductor.config as inductor_config
    import torch._inductor.fx_passes.post_grad as post_grad

    from axolotl_gold.rollouts.engines.decode_step import CompiledStep, DecodeStep

    graphs = []
    reinplace = post_grad.reinplace_inplaceable_ops

    def recorded(*args, **kwargs):
        out = reinplace(*args, **kwargs)
        graphs.append(next(a for a in args if isinstance(a, torch.fx.Graph)))
        return out

    monkeypatch.setattr(post_grad, "reinplace_inplaceable_ops", recorded)
    model = _model()
    ids = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    decode = DecodeStep(model, 4, 64, "cpu")
    decode.reset()
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(force_disable_caches=True):
        decode.prefill(ids, torch.ones_like(ids))
        compiled = CompiledStep(decode)()
        decode.steps.zero_()
        eager = decode()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    (graph,) = graphs
    layer_shape = tuple(decode.cache.layers[0].keys.shape)

    def targets(op):
        return [tuple(n.args[0].meta["val"].shape) for n in graph.nodes if n.target is op]

    assert layer_shape not in targets(torch.ops.aten.copy_.default)
    # keys and values of each layer, written in place
    assert targets(torch.ops.aten.index_put_.default).count(layer_shape) == 2 * len(decode.cache.layers)


def test_compiled_step_with_fused_projections_and_a_refill_equals_the_eager_step():
    """The compiled step's in-place cache writes (rows indexed inside the graph) with each
    layer's projections fused, a slot refilled between two steps: the same logits as the
    eager step at every step."""
    from axolotl_gold.rollouts.engines.decode_step import CompiledStep, DecodeStep
    from axolotl_gold.rollouts.engines.fused_projections import fused_projections

    def run(compiled: bool) -> torch.Tensor:
        model = _model()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (3, 5), generator=g)
        decode = DecodeStep(model, 3, 64, "cpu")
        decode.reset(30)
        out = []
        with torch.no_grad():
            decode.prefill(ids, torch.ones_like(ids))
            with fused_projections(model, True):
                step = CompiledStep(decode) if compiled else decode
                for t in range(10):
                    if t == 4:
                        new = torch.randint(3, VOCAB, (1, 7), generator=g)
                        decode.prefill(new, torch.ones_like(new), slots=torch.tensor([1]))
                    logits = step()
                    out.append(logits.clone())
                    decode.tokens.copy_(logits.argmax(-1, keepdim=True))
        return torch.stack(out)

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(eager[4, 1], eager[3, 1])  # the refilled slot decodes another prompt
