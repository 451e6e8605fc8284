"""A LoRA student's decode with its projections grouped (``fused_projections``) against
without, the static engine, one process.

    python benchmarks/bench_fused_lora.py [--compile] [--json out.json]     # one GPU
    python benchmarks/bench_fused_lora.py --tiny --device cpu               # anywhere

The 0.5B Qwen2 shape (random weights; bf16 on CUDA, float32 elsewhere) under peft LoRA
(rank --lora-r, every linear layer, random ``B`` so the adapters count), --batch prompts of
--prompt tokens decoded to exactly --new tokens (greedy, no stop token). Variants, each
called once per round on the same prompts (the rounds interleave them; a warm-up call each
first):

- ``unfused``: ``StaticCacheEngine(fuse_projections=False)``: each LoRA layer runs peft's
  forward (a base GEMM, an ``A`` GEMM, a ``B`` GEMM, the scaled add);
- ``fused``: ``fuse_projections=True``: a layer's q/k/v and gate/up as one base GEMM and one
  ``A`` GEMM per group, each ``B`` on its slice.

Per variant: device-synced seconds per call and per token step (the prefill in), the matrix
multiplications per token step (``aten::mm`` / ``addmm`` / ``bmm`` calls in one profiled call:
host-side launches, or inductor's extern GEMM calls when compiled), and both against
``unfused``. The two variants' completions are compared (equal greedy tokens expected; on a
GPU bf16 rounding of two different GEMM groupings may move a near-tie).
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
from bench_refill import sync  # noqa: E402

VARIANTS = ("unfused", "fused")
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile_decode.add_shape_args(p)
    profile_decode.add_call_args(p)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="compile_decode (torch.compile of the decode step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, 4 prompts of 16 + 32 tokens")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        profile_decode.tiny_shape(args, layers=2)
        args.lora_r = 4
    return args


def lora_model(args):
    from peft import LoraConfig, get_peft_model

    model = profile_decode.build(args, args.device)
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                        target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(model, config).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.01)  # adapters that move the outputs without swamping the base model
    return model


def gemm_calls(engine, prompts) -> int:
    """GEMM calls in one engine call (the host-side ATen ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.generate(prompts, seed=0)
    return sum(e.count for e in prof.key_averages() if e.key in GEMMS)


def run(args) -> dict:
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine

    model = lora_model(args)
    pad = args.vocab - 2
    sampling = SamplingSettings(max_new_tokens=args.new, temperature=0.0)  # no stop ids: every row runs to --new
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, pad, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    engines = {name: StaticCacheEngine(lambda: model, sampling, pad, set(), batch_size=args.batch,
                                       compile_decode=args.compile, fuse_projections=name == "fused")
               for name in VARIANTS}
    seconds = {name: [] for name in VARIANTS}
    completions, gemms = {}, {}
    with torch.no_grad():
        for name, engine in engines.items():
            completions[name] = engine.generate(prompts, seed=0)  # warm-up: allocator, kernels, the compile
            gemms[name] = gemm_calls(engine, prompts) / args.new
        for _ in range(args.rounds):
            for name, engine in engines.items():
                sync(args.device)
                start = time.perf_counter()
                engine.generate(prompts, seed=0)
                sync(args.device)
                seconds[name].append(time.perf_counter() - start)
    rows = {}
    for name in VARIANTS:
        s = sum(seconds[name]) / len(seconds[name])
        rows[name] = {"s_per_call": s, "ms_per_token_step": 1e3 * s / args.new, "gemms_per_token_step": gemms[name]}
    for row in rows.values():
        row["time_vs_unfused"] = row["s_per_call"] / rows["unfused"]["s_per_call"]
        row["gemms_vs_unfused"] = row["gemms_per_token_step"] / rows["unfused"]["gemms_per_token_step"]
    same = sum(a == b for a, b in zip(completions["unfused"], completions["fused"]))
    return {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "config": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab", "batch", "prompt",
                                                     "new", "lora_r", "rounds", "compile")},
            "rows": rows, "equal_completions": f"{same} of {len(prompts)}"}


def table(result: dict) -> str:
    lines = [f"device {result['device']}, {result['config']}; greedy completions equal: {result['equal_completions']}",
             "| variant | s per call | ms per token step | GEMM calls per token step | time vs unfused | GEMMs vs unfused |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['s_per_call']:.3f} | {r['ms_per_token_step']:.3f} | {r['gemms_per_token_step']:.1f} "
                     f"| {r['time_vs_unfused']:.2f} | {r['gemms_vs_unfused']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
