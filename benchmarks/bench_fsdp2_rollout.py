"""Rollouts under FSDP2: one generation call of the gathered student with FSDP's forward
hooks left on against set aside (what ``generation_weights`` does), through HF ``generate``
and the static engine, on every process of a torchrun (gloo on CPUs, NCCL on GPUs).

    torchrun --nproc_per_node 2 benchmarks/bench_fsdp2_rollout.py --tiny          # CPU
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp2_rollout.py [--compile]     # 2 GPUs

The student (``profile_decode.build``'s Qwen2 shape, the 0.5B by default) is sharded as
Axolotl's ``TRANSFORMER_BASED_WRAP`` does: ``fully_shard`` per decoder layer, then the root.
Every variant is called inside the groups gathered and kept (``_kept_unsharded``, one
all-gather per group, outside the timing); "hooks on" leaves FSDP's pre/post-forward
hooks on the modules (every decoding forward runs them: host time, and the root's stream
waits, which a CUDA graph capture cannot contain: its error is the row's result), "set
aside" is ``forward_hooks_set_aside``; "no lockstep" is HF generate with ``synced_gpus``
off, as the engine factory builds it (transformers' default for an FSDP model is an
all-reduce of the stop flags every token). Fixed-length rollouts (``min_new_tokens``), the
same prompts and seed for every variant, rounds interleaved after a warm-up call each.
Prints ms per call and per token step (process 0's; every process decodes its own
prompts, no collective inside a call), the ratio to HF generate with the hooks on, and
whether a variant's warm-up rollouts equal its engine's with the hooks on (sampled at
temperature 0.9: on a GPU, HF generate's bf16 logits can differ in the last bit between
calls, e.g. another cuBLAS algorithm, and 256 sampled tokens then part; greedy equality
under FSDP2 is the tests' job: ``tests/test_fsdp2.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import profile_decode  # noqa: E402
from bench_refill import sync  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile_decode.add_shape_args(p)
    profile_decode.add_call_args(p)
    p.add_argument("--compile", action="store_true", help="also the static engine with compile_decode (CUDA)")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model, 4 prompts of 16 + 32 tokens")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        profile_decode.tiny_shape(args, layers=4)
    return args


# the HF engine's generate arguments as the factory passes them (``synced_gpus`` off)
NO_LOCKSTEP = {"generate_kwargs": {"synced_gpus": False}}


def variants(args, device: str) -> dict:
    """name -> (engine class name, hooks set aside, engine keyword arguments). The HF rows
    without ``synced_gpus`` get transformers' default for an FSDP model: lockstep (an
    all-reduce of the stop flags every token), as GOLD sampled before."""
    out = {
        "hf, hooks on": ("hf", False, {}),
        "static, hooks on": ("static", False, {}),
        "hf, set aside": ("hf", True, {}),
        "hf, set aside, no lockstep": ("hf", True, NO_LOCKSTEP),
        "static, set aside": ("static", True, {}),
    }
    if args.compile and device == "cuda":
        out["static compiled, set aside"] = ("static", True, {"compile_decode": True})
    return out


def twin(name: str) -> str:
    """The row a variant's rollouts are compared with: its engine with the hooks on (the
    compiled step has none: other kernels, other rounding)."""
    return name if "compiled" in name else name.split(",")[0] + ", hooks on"


def run(args) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from axolotl_gold.models.fsdp2.gather import _kept_unsharded
    from axolotl_gold.models.fsdp2.groups import _lazy_init, forward_hooks_set_aside, fsdp_modules
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank)
    model = profile_decode.build(args, device)
    mesh = init_device_mesh(device, (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _lazy_init(model)
    pad, eos = args.vocab - 2, args.vocab - 1
    sampling = SamplingSettings(max_new_tokens=args.new, temperature=0.9, top_p=0.95)
    g = torch.Generator().manual_seed(1 + rank)
    prompts = [torch.randint(0, eos - 1, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    classes = {"hf": HFGenerateEngine, "static": StaticCacheEngine}
    engines = {name: (classes[kind](lambda: model, sampling, pad, {eos}, min_new_tokens=args.new, **kwargs), aside)
               for name, (kind, aside, kwargs) in variants(args, device).items()}
    records: dict[str, list | str] = {name: [] for name in engines}
    first: dict[str, list] = {}  # each variant's warm-up rollouts (seed 0)

    def call(name, seed):
        engine, aside = engines[name]
        with _kept_unsharded(fsdp_modules(model)):
            with forward_hooks_set_aside(model) if aside else contextlib.nullcontext():
                sync(device)
                start = time.perf_counter()
                out = engine.generate(prompts, seed=seed)
                sync(device)
                seconds = time.perf_counter() - start
        assert all(len(c) == args.new for c in out), [len(c) for c in out]
        first.setdefault(name, out)
        return seconds

    with torch.no_grad():
        for name in engines:
            try:
                call(name, 0)  # warm-up: allocator, kernels, a compile
            except Exception as err:  # noqa: BLE001 (a capture with FSDP's hooks on: the finding)
                records[name] = f"{type(err).__name__}: {str(err)[:200]}"
        for round_ in range(args.rounds):
            for name in engines:
                if isinstance(records[name], list):
                    records[name].append(call(name, 1 + round_))
    dist.barrier()
    dist.destroy_process_group()
    result = summarize(args, device, world, records)
    for name, row in result["rows"].items():  # the hooks change the time, never the samples
        if name != twin(name) and name in first and twin(name) in first:
            row["same_rollouts_as_hooks_on"] = first[name] == first[twin(name)]
    return rank, result


def summarize(args, device: str, world: int, records: dict) -> dict:
    rows = {}
    for name, runs in records.items():
        if isinstance(runs, str):
            rows[name] = {"error": runs}
            continue
        seconds = sum(runs) / len(runs)
        rows[name] = {"ms_per_call": 1e3 * seconds, "ms_per_token_step": 1e3 * seconds / args.new}
    base = rows.get("hf, hooks on", {}).get("ms_per_call")
    for row in rows.values():
        if "ms_per_call" in row and base:
            row["vs_hf_hooks_on"] = row["ms_per_call"] / base
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "processes": world,
            "config": {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "batch", "prompt", "new", "rounds")},
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"device {result['device']} x {result['processes']} processes (FSDP2), {result['config']}",
             "| variant | ms per call | ms per token step | vs HF generate, hooks on | same rollouts as hooks on |",
             "| --- | ---: | ---: | ---: | --- |"]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
        else:
            lines.append(f"| {name} | {r['ms_per_call']:.1f} | {r['ms_per_token_step']:.2f} | "
                         f"{r.get('vs_hf_hooks_on', float('nan')):.2f}x | {r.get('same_rollouts_as_hooks_on', '')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rank, result = run(args)
    if rank == 0:  # every process decoded its own prompts; process 0's figures
        print(table(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
