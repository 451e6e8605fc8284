"""Controlled quality experiment (issue 17, section 1): does on-policy distillation
through `axolotl train` + GOLD beat the alternatives at equal student training sequences?

    python experiments/quality/run.py --device cuda --budget-min 12 --out DIR
    python experiments/quality/run.py --tiny --device cpu --out DIR      # CPU smoke run

1. Builds, from scratch on the device (plain PyTorch): a Llama teacher trained to high
   accuracy on column-wise addition with carries (``task.py``), a smaller Llama student
   warmed up by SFT on a little data until it first passes ``warm_target`` dev accuracy,
   and the same student with another tokenizer for the cross-tokenizer arms
   (``assets.py``); the teacher's temperature-1 samples on the arm prompts.
2. Runs every arm (``arms.py``) as its own `axolotl train` subprocess, all concurrently
   on the one GPU, at equal steps x window, checkpointing along the way; each arm is
   stopped at the budget's deadline (its checkpoints so far are still scored).
3. Scores the teacher, the starting students and every checkpoint by greedy exact match
   on held-out prompts (>= 500 on the GPU) and writes DIR/quality.md, DIR/quality.json
   and DIR/quality.png (accuracy against steps per arm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))  # axolotl_gold from this checkout

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# (GPU profile, tiny CPU profile)
PROFILES = {
    "full": {
        "digits": 8, "n_eval": 1000, "n_dev": 256, "n_train": 20000, "n_warm": 4000, "warm_target": 0.2,
        "teacher": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024},
        "student": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256},
        "teacher_train": {"batch_size": 256, "lr": 1e-3, "steps": 3000, "warmup": 50, "eval_every": 100,
                          "min_steps": 200, "stop_at": 0.995},
        "student_train": {"batch_size": 64, "lr": 2e-3, "steps": 2000, "warmup": 20, "eval_every": 20,
                          "min_steps": 20},
        "sample_batch": 1024, "eval_batch": 500,
        "micro_batch": 16, "accum": 2, "lr": 5e-4, "checkpoints": 6, "sequence_len": 64,
        "steps_per_min": 25, "reserve_s": 75,
    },
    "tiny": {
        "digits": 4, "n_eval": 32, "n_dev": 32, "n_train": 128, "n_warm": 32, "warm_target": 0.2,
        "teacher": {"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128},
        "student": {"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 64},
        "teacher_train": {"batch_size": 32, "lr": 3e-3, "steps": 20, "warmup": 5, "eval_every": 20,
                          "min_steps": 20, "stop_at": 1.0},
        "student_train": {"batch_size": 16, "lr": 3e-3, "steps": 5, "warmup": 2, "eval_every": 5,
                          "min_steps": 5},
        "sample_batch": 64, "eval_batch": 32,
        "micro_batch": 2, "accum": 2, "lr": 1e-3, "checkpoints": 2, "sequence_len": 32,
        "steps": 4, "reserve_s": 20,
    },
}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse(argv=None):
    from arms import ARM_NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (models, runs, quality.{md,json,png})")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--budget-min", type=float, default=12.0,
                    help="wall-clock budget of the whole run; arms are stopped at it minus a scoring reserve")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data, a few steps (CPU smoke run)")
    ap.add_argument("--arms", default=",".join(ARM_NAMES), help=f"comma list of {ARM_NAMES}")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per arm (default: 25 per budget minute on the GPU, 4 tiny)")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per arm (same teacher and students)")
    ap.add_argument("--workers", type=int, default=None, help="concurrent arms (default: all on cuda, 2 on cpu)")
    ap.add_argument("--n-eval", type=int, default=None, help="held-out prompts (default 1000; tiny 32)")
    ap.add_argument("--lr", type=float, default=None, help="arms' learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the models")
    ap.add_argument("--override", default=None,
                    help='JSON merged into the profile, e.g. \'{"digits": 6, "teacher_train": {"lr": 2e-3}}\'')
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    t_start = time.monotonic()

    import torch

    import arms as arms_mod
    import assets
    import report
    import task

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if not cuda:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    prof = json.loads(json.dumps(PROFILES["tiny" if args.tiny else "full"]))
    for key, value in json.loads(args.override or "{}").items():
        if isinstance(value, dict) and isinstance(prof.get(key), dict):
            prof[key].update(value)
        else:
            prof[key] = value
    if args.n_eval:
        prof["n_eval"] = args.n_eval
    steps = args.steps or prof.get("steps") or max(20, int(prof["steps_per_min"] * args.budget_min))
    lr = args.lr or prof["lr"]
    save_every = max(1, steps // prof["checkpoints"])
    selected = [a for a in arms_mod.ARMS if a.name in args.arms.split(",")]
    unknown = set(args.arms.split(",")) - set(arms_mod.ARM_NAMES)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {arms_mod.ARM_NAMES}")
    cross = any(a.student == "student_bpe" for a in selected)
    deadline = t_start + args.budget_min * 60 - prof["reserve_s"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    digits = prof["digits"]
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    log(f"device {device_name}; {len(selected)} arms x {args.seeds} seed(s), {steps} steps, "
        f"budget {args.budget_min} min; output {out}")

    # 1. teacher, students, data
    spec = {k: prof[k] for k in ("digits", "n_eval", "n_dev", "n_train", "n_warm", "warm_target", "teacher",
                                 "student", "teacher_train", "student_train", "sample_batch")}
    spec["teacher_train"] = {**spec["teacher_train"], "eval_batch": prof["eval_batch"],
                             "max_seconds": 0.2 * args.budget_min * 60}
    spec["student_train"] = {**spec["student_train"], "eval_batch": prof["eval_batch"],
                             "max_seconds": 0.05 * args.budget_min * 60}
    spec.update(seed=args.seed, cross_tokenizer=cross)
    built = assets.build(str(out / "assets"), spec, device, log=log)
    paths = built["paths"]
    t_built = time.monotonic()
    log(f"assets built in {t_built - t_start:.0f}s: teacher {built['teacher_train']}, "
        f"teacher samples correct {built['teacher_samples_correct']:.3f}")

    eval_split = assets.read_jsonl(paths["eval"])
    score = lambda model_dir, tok_dir: report.score_dir(model_dir, tok_dir, eval_split, device,  # noqa: E731
                                                        prof["eval_batch"], digits)
    reference = {"teacher": score(paths["teacher"], paths["teacher"])}
    for key in ("student", "student_bpe"):
        if key in paths:
            reference[key] = score(paths[key], paths[key])
    log("reference: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in reference.items()))

    # 2. arms, concurrently
    runs = [(arm, args.seed + i) for arm in sorted(selected, key=lambda a: a.priority) for i in range(args.seeds)]
    workers = args.workers or (len(runs) if cuda else 2)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] if cuda else None

    def run_arm(arm, seed):
        name = arm.name if args.seeds == 1 else f"{arm.name}_s{seed - args.seed}"
        res = {"name": name, "arm": arm.name, "label": arm.label, "seed": seed, "status": "not run", "reason": ""}
        if time.monotonic() > deadline - 30:
            res["reason"] = "not started: budget spent"
            return res
        workdir = out / "runs" / name
        try:
            cfg = arms_mod.config(arm, paths, workdir, steps=steps, save_every=save_every,
                                  micro_batch=prof["micro_batch"], accum=prof["accum"], lr=lr,
                                  max_completion=task.max_new_tokens(digits), sequence_len=prof["sequence_len"],
                                  seed=seed, cuda=cuda)
            rc, wall = arms_mod.launch(cfg, workdir, deadline, gpu)
            res["wall_s"] = round(wall, 1)
            text = (workdir / "log.txt").read_text(errors="replace")
            if rc == "timeout":
                res["status"], res["reason"] = "timeout", "stopped at the budget's deadline"
            elif rc != 0:
                res["status"], res["reason"] = "failed", f"exit {rc}: {arms_mod.last_error(text)}"
            else:
                res["status"] = "ok"
            log(f"{name}: {res['status']} in {wall:.0f}s {res['reason']}")
            tok_dir = paths[arm.student]
            start = reference[arm.baseline]
            curve = [(0, start["accuracy"])]
            last = None
            for step, ckpt in arms_mod.checkpoints(Path(cfg["output_dir"])):
                last = score(str(ckpt), tok_dir)
                curve.append((step, last["accuracy"]))
                res.setdefault("checkpoints", []).append({"step": step, **last})
            res["curve"] = curve
            if last is not None:
                res.update(steps=curve[-1][0], accuracy=last["accuracy"], se=last["se"], samples=last["samples"],
                           gap_closed=report.gap_closed(last["accuracy"], start["accuracy"],
                                                        reference["teacher"]["accuracy"]))
                log(f"{name}: accuracy {last['accuracy']:.3f} at step {curve[-1][0]}")
            elif res["status"] == "ok":
                res["status"], res["reason"] = "failed", "no checkpoint saved"
        except Exception as e:  # noqa: BLE001 - one arm's failure must not hide the others
            res["status"], res["reason"] = "failed", f"harness: {type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-3000:]
        return res

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: run_arm(*r), runs))
    t_arms = time.monotonic()

    # 3. per-arm summary over seeds, the table, the plot
    summary = []
    for arm in sorted(selected, key=lambda a: a.priority):
        mine = [r for r in results if r["arm"] == arm.name]
        scored = [r for r in mine if r.get("accuracy") is not None]
        row = {"name": arm.name, "label": arm.label, "baseline": arm.baseline,
               "status": ",".join(sorted({r["status"] for r in mine})),
               "reason": "; ".join(r["reason"] for r in mine if r["reason"]),
               "wall_s": max((r.get("wall_s") or 0) for r in mine), "seeds": mine}
        if scored:
            acc, se = report.combine(scored)
            row.update(accuracy=acc, se=se, steps=min(r["steps"] for r in scored),
                       gap_closed=report.gap_closed(acc, reference[arm.baseline]["accuracy"],
                                                    reference["teacher"]["accuracy"]))
            steps_seen = sorted({s for r in scored for s, _ in r["curve"]})
            row["curve"] = [(s, sum(dict(r["curve"]).get(s, float("nan")) for r in scored) / len(scored))
                            for s in steps_seen if all(s in dict(r["curve"]) for r in scored)]
        summary.append(row)
    result = {
        "task": f"column-wise addition of two {digits}-digit numbers with carries",
        "reference": {k: {kk: v for kk, v in r.items() if kk != "samples"} for k, r in reference.items()},
        "reference_samples": {k: r["samples"] for k, r in reference.items()},
        "arms": summary,
        "models": {"teacher_params": built["teacher_params"], "student_params": built["student_params"],
                   **({"student_bpe_params": built["student_bpe_params"]} if "student_bpe_params" in built else {}),
                   "teacher_arch": prof["teacher"], "student_arch": prof["student"]},
        "assets": {k: built[k] for k in built if k.endswith("_train") or k in ("teacher_samples_correct", "n")},
        "settings": {"steps": steps, "save_every": save_every, "window": prof["micro_batch"] * prof["accum"],
                     "micro_batch": prof["micro_batch"], "accum": prof["accum"], "lr": lr, "seeds": args.seeds,
                     "device": device, "device_name": device_name, "budget_min": args.budget_min, "tiny": args.tiny,
                     "digits": digits, "warm_target": prof["warm_target"]},
        "timings": {"build_s": round(t_built - t_start, 1), "arms_s": round(t_arms - t_built, 1),
                    "total_s": round(time.monotonic() - t_start, 1)},
    }
    md = report.markdown(result)
    (out / "quality.md").write_text(md)
    plot_path = report.plot(result, str(out / "quality.png"))
    result["plot"] = plot_path
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    print(md)
    log(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {plot_path}; total {result['timings']['total_s']:.0f}s")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
