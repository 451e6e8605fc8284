"""The sort-free top-p kernels (``rollouts/engines/nucleus.py``) per setting, against one
sort + the tensor CDF, each captured as a CUDA graph and replayed (as the static engine
runs them). One GPU:

    python benchmarks/bench_nucleus.py [--rows 16 --vocab 151936 --top-p 0.95] [--profile]

Prints a table: logits dtype, columns per program, warps, columns per search loop step,
ms per draw, ratio to the sort. ``--profile``: then the kernels of 10 uncaptured draws
per dtype at the defaults (launches, microseconds a launch): which launch costs what.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_decode import graph_timed, kernel_lines  # noqa: E402

from axolotl_gold.rollouts.engines import nucleus  # noqa: E402
from axolotl_gold.rollouts.engines.base import SamplingSettings  # noqa: E402
from axolotl_gold.rollouts.engines.sampling import sample_tokens  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--chunks", default="2048,4096,8192", help="comma-separated columns per program")
    p.add_argument("--warps", default="2,4,8", help="comma-separated warps per program")
    p.add_argument("--search-blocks", default="128", help="comma-separated columns per search loop step")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    search_blocks = [int(b) for b in args.search_blocks.split(",")]
    torch.manual_seed(0)
    uniforms = torch.rand(args.rows, dtype=torch.float64, device="cuda")
    settings = SamplingSettings(max_new_tokens=1, temperature=args.temperature, top_p=args.top_p)
    results = []
    print("| logits | columns per program | warps | search block | ms per draw | x the sort |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(args.rows, args.vocab, device="cuda") * 3).to(dtype)
        sort_ms = graph_timed(lambda: sample_tokens(logits, settings, uniforms, fused=False), 200)
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | one sort + tensor CDF | | | {sort_ms:.3f} | 1.00 |", flush=True)
        for chunk in [int(c) for c in args.chunks.split(",")]:
            for warps in [int(w) for w in args.warps.split(",")]:
                for block in search_blocks:
                    ms = graph_timed(lambda: nucleus.nucleus_sample(
                        logits, uniforms, args.temperature, args.top_p, chunk=chunk, warps=warps,
                        search_block=block), 200)
                    results.append(dict(dtype=name, chunk=chunk, warps=warps, search_block=block, ms=ms,
                                        sort_ms=sort_ms))
                    print(f"| {name} | {chunk} | {warps} | {block} | {ms:.3f} | {ms / sort_ms:.2f} |", flush=True)
    if args.profile:
        for dtype in (torch.bfloat16, torch.float32):
            logits = (torch.randn(args.rows, args.vocab, device="cuda") * 3).to(dtype)
            nucleus.nucleus_sample(logits, uniforms, args.temperature, args.top_p)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    nucleus.nucleus_sample(logits, uniforms, args.temperature, args.top_p)
                torch.cuda.synchronize()
            print(f"\nkernels of one draw, {str(dtype).removeprefix('torch.')} logits:")
            print(kernel_lines(prof.key_averages(), steps=10))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
