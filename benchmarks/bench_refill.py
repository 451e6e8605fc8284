"""Ragged rollouts when a window has more prompts than fit at once: slots refilled with
waiting prompts against one batch after another (the static engine, one process).

    python benchmarks/bench_refill.py [--compile] [--json out.json]      # one GPU
    python benchmarks/bench_refill.py --tiny --device cpu                # anywhere

64 prompts of 256 tokens through 16 slots, up to 768 new tokens, lengths geometric with a
mean of 40% of the limit (``ragged.py``'s stop set on a random-weight 0.5B Qwen2 shape),
sampled at temperature 0.9 / top-p 0.95. Variants, each called once per round on the same
prompts and seed (the rounds interleave them; a warm-up call each first):

- ``refill``: ``StaticCacheEngine(batch_size=16)``, a slot whose row stopped starts the
  next waiting prompt (the default);
- ``chunked``: the same with ``refill_slots=False``: 4 batches one after another, each
  until its longest row;
- ``one batch``: all 64 rows at once (what a GPU with room for them runs; not the case
  under test, the floor of steps; ``--variants refill,chunked`` leaves it out).

Per variant: device-synced seconds per call, tokens per second, decode steps and
row-steps (the engine's counters) and the same replayed from the lengths
(``ragged.engine_schedule``), length statistics, and time and steps against ``chunked``.
A decode step costs about the same at 4 or 16 rows on a GPU, so steps are what refilling
saves there; on a CPU a step's cost grows with its rows, so the time ratio is smaller.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_decode  # noqa: E402
import ragged  # noqa: E402

VARIANTS = ("refill", "chunked", "one batch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile_decode.add_shape_args(p)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=768)
    p.add_argument("--fraction", type=float, default=ragged.TARGET_FRACTION, help="mean length / --new")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--every", type=int, default=ragged.EOS_CHECK_EVERY,
                   help="eos_check_every: token steps between reads of the stop flags")
    p.add_argument("--compile", action="store_true", help="compile_decode (torch.compile of the decode step)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, of: refill, chunked, one batch (chunked is the baseline, always run; "
                        "compiled, 'one batch' adds two row buckets to compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, 16 prompts of 16 + 48 tokens, 4 slots")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in VARIANTS if v in args.variants.split(",") or v == "chunked"]
    if args.tiny:
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate = 2, 64, 4, 2, 128
        args.vocab, args.prompts, args.slots, args.prompt, args.new = 4096, 16, 4, 16, 48
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine

    model = profile_decode.build(args, args.device)
    pad, eos = args.vocab - 2, args.vocab - 1
    stops = set(ragged.stop_ids(args.vocab, args.new, [eos, pad], args.fraction))
    sampling = SamplingSettings(max_new_tokens=args.new, temperature=0.9, top_p=0.95)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, min(stops), (args.prompt,), generator=g).tolist() for _ in range(args.prompts)]
    settings = {"refill": {"batch_size": args.slots}, "chunked": {"batch_size": args.slots, "refill_slots": False},
                "one batch": {"batch_size": args.prompts}}
    settings = {name: settings[name] for name in args.variants}
    engines = {name: StaticCacheEngine(lambda: model, sampling, pad, stops, compile_decode=args.compile,
                                       eos_check_every=args.every, **kwargs)
               for name, kwargs in settings.items()}
    records = {name: [] for name in args.variants}
    with torch.no_grad():
        for name, engine in engines.items():
            engine.generate(prompts, seed=0)  # warm-up: allocator, kernels, the compile
        for round_ in range(args.rounds):
            for name, engine in engines.items():
                steps, row_steps = engine.token_steps, engine.row_steps
                sync(args.device)
                start = time.perf_counter()
                out = engine.generate(prompts, seed=1 + round_)
                sync(args.device)
                records[name].append({
                    "s": time.perf_counter() - start, "lengths": [len(c) for c in out],
                    "token_steps": engine.token_steps - steps, "row_steps": engine.row_steps - row_steps,
                })
    return summarize(args, records, engines)


def summarize(args, records: dict, engines: dict) -> dict:
    kinds = {"refill": "static", "chunked": "static-chunked", "one batch": "static"}
    if args.compile and args.device == "cuda":
        kinds["refill"] = kinds["one batch"] = "static-compiled"
    rows = {}
    for name, runs in records.items():
        slots = args.prompts if name == "one batch" else args.slots
        replayed = [ragged.engine_schedule(r["lengths"], args.new, kinds[name], slots=slots, every=args.every)
                    for r in runs]
        lengths = [n for r in runs for n in r["lengths"]]
        seconds = sum(r["s"] for r in runs) / len(runs)
        rows[name] = {
            "s_per_call": seconds, "tokens_per_s": len(lengths) / len(runs) / seconds * (sum(lengths) / len(lengths)),
            "token_steps": sum(r["token_steps"] for r in runs) / len(runs),
            "row_steps": sum(r["row_steps"] for r in runs) / len(runs),
            "replayed_steps": sum(s for s, _ in replayed) / len(runs),
            "replayed_row_steps": sum(r for _, r in replayed) / len(runs),
            "lengths": ragged.length_stats(lengths, args.new),
            "refills": engines[name].refills,
        }
    base = rows["chunked"]
    for row in rows.values():
        row["time_vs_chunked"] = row["s_per_call"] / base["s_per_call"]
        row["steps_vs_chunked"] = row["token_steps"] / base["token_steps"]
    return {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "config": {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "prompts", "slots", "prompt",
                                                     "new", "fraction", "rounds", "every", "compile")},
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"device {result['device']}, {result['config']}",
             "| variant | s per call | tokens/s | decode steps (replayed) | row-steps (replayed) | mean len | p90 len"
             " | time vs chunked | steps vs chunked |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['s_per_call']:.3f} | {r['tokens_per_s']:,.0f} | {r['token_steps']:.0f} "
            f"({r['replayed_steps']:.0f}) | {r['row_steps']:.0f} ({r['replayed_row_steps']:.0f}) | "
            f"{r['lengths']['mean']:.1f} | {r['lengths']['p90']} | {r['time_vs_chunked']:.2f}x | "
            f"{r['steps_vs_chunked']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
