"""Where a decode step of the static engine spends its time (one GPU).

    python benchmarks/profile_decode.py [--layers 24 --hidden 896 ...] [--json out.json]

The 0.5B-shaped student of ``bench_vs_reference.py`` (Qwen2: 24 layers, hidden 896,
14 query / 2 KV heads, vocabulary 151,936; random bf16 weights) at batch 16, prompt 256,
768 new tokens. Prints one table, each row device-synced and timed in this process:

- the engine's whole call per token step (prefill included), forced to full length;
- the captured decode graph replayed alone (the model's forward for one token);
- one layer's decode attention alone, captured, the cache filled to its middle: the Triton
  kernel (``decode_kernel.py``) against the tensor version (``--attention`` picks which
  of the two the engine rows use; both by default);
- the per-token sampling alone (temperature, top-p, the inverse-CDF draw), captured as a
  CUDA graph: the sort-free kernels against one sort + the tensor CDF;
- the lm_head matmul alone, and the weight-read floor (bytes of weights and KV cache
  at the device's measured copy bandwidth);
- the top CUDA kernels of a few eager decode steps (torch.profiler).

``--axolotl-dtypes``: the same model with Axolotl's float32 embeddings / head / norms under bf16
autocast (``axolotl_dtypes``), as the student is during `axolotl train`'s generation.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace
from typing import NamedTuple

import torch

from axolotl_gold.rollouts.engines.fused_projections import fused_projections


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model's shape (``build``): the 0.5B Qwen2 student by default."""
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--vocab", type=int, default=151936)


def add_call_args(p: argparse.ArgumentParser, new: int = 256) -> None:
    """One engine call's prompts (the engine benchmarks that time calls in rounds)."""
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=new)
    p.add_argument("--rounds", type=int, default=3)


def tiny_shape(args, layers: int) -> None:
    """``--tiny``: a ``layers``-layer model of width 64, 4 prompts of 16 + 32 tokens."""
    args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = layers, 64, 4, 2, 128
    args.vocab, args.batch, args.prompt, args.new = 4096, 4, 16, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=768)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--compile", action="store_true",
                   help="also the engine with compile_decode (torch.compile of the decode step, captured)")
    p.add_argument("--only-compile", action="store_true",
                   help="the engine with compile_decode alone (no HF sdpa / grouped eager engine rows)")
    p.add_argument("--compile-modes", default="default",
                   help="comma-separated torch.compile modes of the compiled rows (default: its default; "
                        "max-autotune-no-cudagraphs: GEMMs tuned, the engine captures the step itself)")
    p.add_argument("--fuse-projections", choices=("off", "on", "both"), default="off",
                   help="compiled rows with each layer's q/k/v and gate/up projections as one GEMM each "
                        "(StaticCacheEngine fuse_projections), without, or a row each")
    p.add_argument("--attention", choices=("both", "kernel", "tensor"), default="both",
                   help="grouped decode attention: the Triton kernel (decode_kernel.py), the tensor version, or a row each")
    p.add_argument("--axolotl-dtypes", action="store_true",
                   help="embeddings, tied head and norms float32 under bf16 autocast, as `axolotl train` runs a bf16 "
                        "full fine-tune (the trainer's generation ran ~0.3 ms a step slower than this benchmark's bf16 model)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


class _Rows(dict):
    """The table's rows, each also printed when measured (a cut-off run keeps them)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"[profile] {key}: {value:.3f}", flush=True)


def timed(fn, repeats: int) -> float:
    """Milliseconds per call, device-synced."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def graph_timed(fn, repeats: int) -> float:
    """Milliseconds per replay of ``fn`` captured as a CUDA graph (as the engine runs it:
    launch costs gone, device time left)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles Triton kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, repeats)


def sorted_top_p(logits, top_p: float):
    """The sort-and-cumsum top-p (HF's ``TopPLogitsWarper``) alone."""
    sorted_logits, order = torch.sort(logits, dim=-1)
    remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
    remove_sorted[..., -1] = False
    return logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))


def rewind(cache, decode, width: int) -> None:
    """Back to the first decode position (each row writes at its start + step)."""
    decode.steps.zero_()


def replay_ms(graph, cache, decode, width: int, new: int) -> float:
    """Milliseconds per replay over the positions of a real call (the cache never overflows)."""
    steps = new - 2
    rewind(cache, decode, width)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def attention_rows(rows, args, total: int) -> None:
    """One layer's decode attention, captured: the kernel against the tensor version, over
    a cache of ``total`` columns whose first half (prompt and tokens so far) is attended."""
    from axolotl_gold.rollouts.engines.decode_attention import grouped_decode_attention
    from axolotl_gold.rollouts.engines.decode_kernel import flash_decode

    dim = args.hidden // args.heads
    q = torch.randn(args.batch, args.heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(args.batch, args.kv_heads, total, dim, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    mask = torch.zeros(args.batch, 1, 1, total, dtype=torch.bool, device="cuda")
    mask[..., : total // 2] = True
    scale = dim ** -0.5
    for name, fn in (("Triton kernel", flash_decode), ("tensor version", grouped_decode_attention)):
        rows[f"one layer's decode attention, cache half filled, {name}, captured, ms"] = graph_timed(
            lambda: fn(q, k, v, mask, scale), 200)
    difference = (flash_decode(q, k, v, mask, scale).float() - grouped_decode_attention(q, k, v, mask, scale).float())
    rows["one layer's decode attention, max |kernel - tensor version|"] = difference.abs().max().item()


def emit_step(args, model, sampling, pad: int, eos: int, seeds: torch.Tensor, logits: torch.Tensor):
    """Everything of a token step after the forward (``StaticCacheEngine._emit``: EOS
    suppression, uniforms, sampling, recording, stop flags) on ``logits``, as a callable
    for ``graph_timed``; and the ``RowState`` it records into."""
    from axolotl_gold.rollouts.engines.static import RowState, StaticCacheEngine

    device = logits.device
    emitter = StaticCacheEngine(lambda: model, sampling, pad, {eos}, min_new_tokens=args.new)
    state = RowState(pad, args.new, seeds, [eos], device, args.batch)
    state.assign(torch.arange(args.batch, device=device), torch.arange(args.batch, device=device))
    fed = SimpleNamespace(steps=torch.zeros(args.batch, dtype=torch.long, device=device),
                          tokens=torch.zeros(args.batch, 1, dtype=torch.long, device=device))
    return (lambda: emitter._emit(logits.clone(), fed, state)), state


class Variant(NamedTuple):
    grouped: bool
    compiled: bool
    kernel: bool
    mode: str | None = None  # torch.compile's
    fused: bool = False  # fuse_projections


def kernel_lines(averages, steps: int, limit: int = 40) -> str:
    """The kernels of ``steps`` profiled steps, longest total first, with their whole names
    (the table cuts them at 55 characters: inductor's fused kernels are told apart by the ops
    their names list): launches a step, microseconds a launch, milliseconds a step."""
    rows = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    lines = ["| launches a step | us a launch | ms a step | kernel |", "| ---: | ---: | ---: | --- |"]
    for e in rows[:limit]:
        lines.append(f"| {e.count / steps:.1f} | {e.self_device_time_total / e.count:.2f} | "
                     f"{e.self_device_time_total / steps / 1e3:.3f} | `{e.key}` |")
    return "\n".join(lines)


def decode_variants(args) -> list[Variant]:
    """The engine rows the arguments ask for."""
    kernels = {"both": (False, True), "kernel": (True,), "tensor": (False,)}[args.attention]
    modes = [None if m == "default" else m for m in args.compile_modes.split(",")]
    fuse = {"off": (False,), "on": (True,), "both": (False, True)}[args.fuse_projections]
    compiled_rows = [Variant(True, True, k, m, f) for m in modes for f in fuse for k in kernels]
    if args.only_compile:
        return compiled_rows
    eager = [Variant(False, False, False)] + [Variant(True, False, k) for k in kernels]
    return eager + (compiled_rows if args.compile else [])


def variant_label(grouped: bool, compiled: bool, kernel: bool, mode: str | None = None, fused: bool = False) -> str:
    if not grouped:
        return "HF sdpa (repeat_kv)"
    name = "grouped, Triton kernel" if kernel else "grouped, tensor version"
    name += f" + torch.compile{f' ({mode})' if mode else ''}" if compiled else ""
    return name + (" + fused projections" if fused else "")


def build(args, device: str = "cuda"):
    """The random-weight Qwen2-shaped model of ``args`` (bf16 on CUDA, float32 elsewhere)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def axolotl_dtypes(model) -> None:
    """The student as `axolotl train` loads a bf16 full fine-tune with sdpa: the embeddings (and
    the head tied to them) and every module named ``*norm*`` in float32
    (``ModelLoader._convert_embedding_modules_dtype``); the caller runs it under bf16 autocast, as
    Accelerate does. The residual stream is then float32 through every layer."""
    for name, module in model.named_modules():
        if ("norm" in name or name.endswith(("embed_tokens", "lm_head"))) and hasattr(module, "weight"):
            module.to(torch.float32)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = build(args)
    if args.axolotl_dtypes:
        axolotl_dtypes(model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.axolotl_dtypes):
        return _measure(args, model)


def _measure(args, model) -> dict:
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.noise import row_seeds, row_uniforms
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine, CompiledStep, DecodeStep, sample_tokens

    vocab = args.vocab
    pad, eos = vocab - 3, vocab - 1
    sampling = SamplingSettings(max_new_tokens=args.new, temperature=args.temperature, top_p=args.top_p)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab - 10, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    rows = _Rows()

    variants = decode_variants(args)
    for variant in variants:
        grouped, compiled, kernel, mode, fused = variant
        engine = StaticCacheEngine(
            lambda: model, sampling, pad, {eos}, min_new_tokens=args.new, grouped_attention=grouped,
            decode_kernel=kernel, compile_decode=compiled, compile_mode=mode, fuse_projections=fused,
        )
        with torch.no_grad():
            start = time.perf_counter()
            engine.generate(prompts, seed=0)  # warm-up (allocator, kernels; the compile)
            torch.cuda.synchronize()
            label = variant_label(*variant)
            if compiled:
                rows[f"first engine call, s (compiles once per shape), {label}"] = time.perf_counter() - start
            start = time.perf_counter()
            engine.generate(prompts, seed=1)
            torch.cuda.synchronize()
        rows[f"engine call, ms per token step, {label}"] = (time.perf_counter() - start) * 1e3 / args.new

    # the decode forward alone: a captured graph replayed
    with torch.no_grad():
        width, total = args.prompt, args.prompt + args.new
        ids = torch.tensor(prompts, device="cuda")
        mask = torch.ones_like(ids)
        for variant in variants:
            grouped, compiled, kernel, mode, fused = variant
            decode = DecodeStep(model, args.batch, total, "cuda", grouped, kernel)
            decode.reset()
            decode.prefill(ids, mask)
            rewind(decode.cache, decode, width)
            with fused_projections(model, fused):
                _, graph, _ = engine._first_step_and_capture(CompiledStep(decode, mode) if compiled else decode)
                rows[f"decode graph replay (forward), ms, {variant_label(*variant)}"] = replay_ms(
                    graph, decode.cache, decode, width, args.new)
            del graph, decode
        attention_rows(rows, args, total)
        logits = torch.randn(args.batch, vocab, device="cuda", dtype=torch.bfloat16)
        seeds = row_seeds(0, torch.arange(args.batch, device="cuda"))
        uniforms = row_uniforms(seeds, 3)
        for dtype in (torch.bfloat16, torch.float32):  # as a bf16 / a float32 model returns them
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            cast = logits.to(dtype)
            for fused in (True, False):
                how = "sort-free kernels (nucleus.py)" if fused else "one sort + tensor CDF"
                rows[f"sampling, top-p {args.top_p} + draw, {how}, {name} logits, captured, ms"] = graph_timed(
                    lambda: sample_tokens(cast, sampling, uniforms, fused=fused), 200)
        plain = SamplingSettings(max_new_tokens=1, temperature=args.temperature)
        for fused in (True, False):
            how = "kernels" if fused else "tensor CDF"
            rows[f"sampling without top-p, {how}, bf16 logits, captured, ms"] = graph_timed(
                lambda: sample_tokens(logits, plain, uniforms, fused=fused), 200)
        scaled = logits.float() / args.temperature
        rows["top-p by a full-vocabulary sort (HF's rule), ms"] = timed(lambda: sorted_top_p(scaled, args.top_p), 100)
        rows["row uniforms (counter hash), ms"] = timed(lambda: row_uniforms(seeds, 3), 100)
        step = torch.zeros((), dtype=torch.long, device="cuda")
        rows["row uniforms (counter hash), captured, ms"] = graph_timed(lambda: row_uniforms(seeds, step), 200)
        # everything of a token step after the forward: EOS suppression (min_new_tokens),
        # uniforms, sampling, recording, stop flags
        emit, _ = emit_step(args, model, sampling, pad, eos, seeds, logits)
        rows["token step after the forward (StaticCacheEngine._emit), captured, ms"] = graph_timed(emit, 200)
        greedy = SamplingSettings(max_new_tokens=1, temperature=0.0)
        rows["sampling greedy (argmax), ms"] = timed(lambda: sample_tokens(logits.float(), greedy, None), 100)
        hidden = torch.randn(args.batch, args.hidden, device="cuda", dtype=torch.bfloat16)
        head = model.lm_head.weight
        rows["lm_head matmul alone, ms"] = timed(lambda: hidden @ head.T, 200)
        # floor: weights + this step's KV cache (K and V, all layers) read once
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_bytes = 2 * args.layers * args.batch * args.kv_heads * (args.hidden // args.heads) * total * 2
        big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        copy_ms = timed(lambda: big.clone(), 50)
        bandwidth = 2 * big.numel() / (copy_ms / 1e3)  # read + write
        rows["floor: weights + KV read at copy bandwidth, ms"] = (weight_bytes + kv_bytes) / bandwidth * 1e3
        rows["copy bandwidth, TB/s"] = bandwidth / 1e12

        from torch.profiler import ProfilerActivity, profile

        # the kernels of 10 decode steps, not captured (device times; launch gaps excluded):
        # of each compiled variant as the engine runs it when any ran, else of the last (eager)
        for variant in [v for v in variants if v.compiled] or variants[-1:]:
            decode = DecodeStep(model, args.batch, total, "cuda", variant.grouped, variant.kernel)
            decode.reset()
            decode.prefill(ids, mask)
            step = CompiledStep(decode, variant.mode) if variant.compiled else decode
            with fused_projections(model, variant.fused):
                for _ in range(3):
                    step()
                torch.cuda.synchronize()  # 13 steps in all: well inside the cache
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
            averages = prof.key_averages()
            label = variant_label(*variant)
            rows[f"kernels' device time per decode step (not captured), ms, {label}"] = (
                sum(e.self_device_time_total for e in averages) / 10 / 1e3)
            rows[f"kernel launches per decode step, {label}"] = sum(e.count for e in averages) / 10
            print(f"kernels, {label}:")
            print(averages.table(sort_by="self_device_time_total", row_limit=25))
            print(kernel_lines(averages, steps=10))
    width_name = max(map(len, rows))
    print(f"\n| {'measure'.ljust(width_name)} | value |\n| {'-' * width_name} | ----- |")
    for name, value in rows.items():
        print(f"| {name.ljust(width_name)} | {value:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
