"""Peak memory per GPU and tokens/s on 2 GPUs (DDP, FSDP2, ZeRO-3) against one GPU, through
`axolotl train` (`accelerate launch`, one process per GPU), in one table.

bench_cli's configuration and models (Qwen2-shaped ~0.5B student, ~1.5B teacher, vocabulary
151,936, bf16, lmbda 1, every rollout forced to --completion tokens), the same YAML per row
with only the strategy's keys added; each process takes micro batch x accumulation rows, so
2 processes score twice the tokens of one per step. Rows:
  1 GPU             the default engine (`auto`: the static-cache engine on CUDA)
  1 GPU hf engine   `gold_generation_engine: hf`, what FSDP2 and ZeRO-3 run (the static
                    engine's CUDA graphs are refused under sharding)
  DDP 2 GPUs        no sharding keys (student and teacher whole on each GPU)
  FSDP2 2 GPUs      `fsdp_version: 2` + `fsdp_config` (teacher sharded for inference)
  ZeRO-3 2 GPUs     `deepspeed: deepspeed_configs/zero3.json`
The two 1-GPU rows run at the same time, one per GPU; the others one after another.
tokens/s = scored completion tokens of all processes / step wall time (the gap between log
lines, as bench_cli); peak GiB = process 0's max allocated over all steps; "vs 1 GPU" divides
by the 1-GPU row of the same engine.

    PYTHONPATH=/tmp/axsite:$PWD python3 benchmarks/bench_multi_gpu.py --completion 256   # 2 GPUs
    source scripts/env.sh && .venv/bin/python benchmarks/bench_multi_gpu.py --tiny --device cpu --rows "1 GPU"
Other flags are bench_cli's (--completion, --micro-batch, --grad-accum, --warmup, --steps, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cli  # noqa: E402

FSDP2 = {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                             "state_dict_type": "FULL_STATE_DICT",
                                             "reshard_after_forward": True}}
ZERO3 = {"deepspeed": str(HERE.parent / "deepspeed_configs" / "zero3.json")}
HF = {"gold_generation_engine": "hf"}
# name -> (YAML keys, CUDA_VISIBLE_DEVICES, the 1-GPU row it is compared with, phase)
ROWS = {
    "1 GPU": ({}, "0", "1 GPU", 0),
    "1 GPU hf engine": (HF, "1", "1 GPU hf engine", 0),
    "DDP 2 GPUs": ({}, "0,1", "1 GPU", 1),
    "FSDP2 2 GPUs": (FSDP2, "0,1", "1 GPU hf engine", 2),
    "ZeRO-3 2 GPUs": ({**ZERO3, **HF}, "0,1", "1 GPU hf engine", 3),
}


def run_row(name: str, own, args, bvr, models: Path, root: Path, port: int) -> dict:
    import yaml

    keys, gpus, _, _ = ROWS[name]
    work = root / name.replace(" ", "_").replace(",", "")
    work.mkdir(parents=True, exist_ok=True)
    path = bench_cli.write_config(own, args, bvr, models, work)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(keys)
    if "fsdp_config" in keys or "deepspeed" in keys:
        cfg["optimizer"] = "adamw_torch"  # the sharded rows' parameters: no fused kernel promised
    path.write_text(yaml.safe_dump(cfg))
    cuda = args.device.startswith("cuda")
    row = bench_cli.train(path, work, cuda=cuda, min_new_tokens=args.completion, warmup=args.warmup,
                          steps=args.steps, timeout=own.timeout, gpus=gpus if cuda else "", port=port)
    row["gpus"] = len(gpus.split(",")) if cuda else 0
    return row


def table(results: dict[str, dict], args) -> str:
    lines = [
        f"student {'tiny' if args.tiny else '~0.5B'}, teacher {'tiny' if args.tiny else '~1.5B'}, vocab {args.vocab}, "
        f"prompt {args.prompt} + completion {args.completion} (forced), micro batch {args.micro_batch} x accum "
        f"{args.grad_accum} per process, {'bf16' if args.device.startswith('cuda') else 'float32'}, lmbda 1; mean of {args.steps} step(s) after {args.warmup} warm-up",
        "",
        "| run | GPUs | tokens/s | vs 1 GPU | per GPU vs 1 GPU | step s | generation s | teacher s | student s "
        "| peak GiB (process 0) | peak vs 1 GPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error'][:200]} | | | | | | | | |")
            continue
        base = results.get(ROWS[name][2], {})
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        per_gpu = ratio / max(r["gpus"], 1) if ratio else None
        peak = r["peak_gib"] / base["peak_gib"] if r.get("peak_gib") and base.get("peak_gib") else None
        lines.append(
            f"| {name} | {r['gpus']} | {r['tokens_per_s']:.0f} | {bench_cli.fmt(ratio, '{:.2f}x')} "
            f"| {bench_cli.fmt(per_gpu, '{:.2f}x')} | {r['step_s']:.2f} | {r['generation_s']:.2f} "
            f"| {r['teacher_s']:.2f} | {r['student_s']:.2f} | {bench_cli.fmt(r.get('peak_gib'))} "
            f"| {bench_cli.fmt(peak, '{:.2f}x')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS")
    mine, rest = p.parse_known_args(argv)
    own, args, bvr = bench_cli.parse_args(rest)
    names = [n.strip() for n in mine.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    models = bench_cli.model_dir(own, args, bvr)
    if not (models / "done").exists():
        built = bench_cli.run_child("build", rest, own.timeout)
        if "error" in built:
            raise SystemExit(f"building the models failed: {built['error']}")
    root = Path(own.workdir or tempfile.mkdtemp(prefix="gold_multi_gpu_"))
    results: dict[str, dict] = {}
    for phase in sorted({ROWS[n][3] for n in names}):
        members = [n for n in names if ROWS[n][3] == phase]
        threads = [threading.Thread(target=lambda n=n, i=i: results.__setitem__(
            n, run_row(n, own, args, bvr, models, root, 29500 + 10 * phase + i))) for i, n in enumerate(members)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in members:
            print(f"[{n}] {json.dumps(results.get(n, {'error': 'no result'}))}", flush=True)
    ordered = {n: results.get(n, {"error": "no result"}) for n in names}
    print("\n" + table(ordered, args), flush=True)
    if own.json:
        Path(own.json).write_text(json.dumps(ordered, indent=1))


if __name__ == "__main__":
    main()
