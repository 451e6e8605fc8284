"""Prune-then-distill SmolLM2-135M-Instruct on the CPU (issue 17, section 2).

    python experiments/real_model/run.py --out DIR [--steps 60] [--n-eval 100]
    python experiments/real_model/run.py --out DIR --smoke      # a few steps, a small eval

Teacher: the real SmolLM2-135M-Instruct (``.assets/smollm2-135m-instruct``, built by
scripts/real_model.py). Student: the same checkpoint keeping ``--keep`` layers, saved once
as an HF checkpoint with the teacher's tokenizer and chat template. Prompts: short
instructions generated locally (``prompts.py``), split into train and held-out.

Arms, each one `axolotl train` subprocess (the quality experiment's ``arms.config`` /
``arms.launch``) at equal steps x window, one completion per row:

* ``onpolicy``: GOLD ``lmbda: 1``, ``beta: 0.5``, on prompt-only rows;
* ``sft``: plain Axolotl SFT (no plugin) on the teacher's greedy answers to the train prompts;
* ``supkd``: GOLD ``lmbda: 0``, ``beta: 0.5`` on the same teacher answers (supervised KD).

Every job (teacher answers, training runs, evaluations) goes through a scheduler of
``--workers`` slots (default 2: this machine's 2 cores), one thread of torch each.
Scores on the held-out prompts: ROUGE-L of greedy answers against the teacher's greedy
answers and the teacher's mean log-probability per token of them (``tables.py``).
Writes DIR/results.md and DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "quality"))  # the quality experiment's arms helpers
sys.path.insert(2, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEACHER = REPO / ".assets" / "smollm2-135m-instruct"
# the middle-to-late block 14..23 dropped: 20 of 30 layers. Dropping every other layer,
# every third, or layers 8..23 gave pure noise (ROUGE-L 0 against the teacher); this one
# starts clearly worse than the teacher (ROUGE-L ~0.08) yet still writes words.
KEEP = list(range(14)) + list(range(24, 30))

ARM_SPECS = {
    # name: (label, GOLD keys or None for plain SFT, data key)
    "onpolicy": ("on-policy GOLD, JSD beta 0.5, lmbda 1", {"lmbda": 1.0, "beta": 0.5}, "prompts"),
    "sft": ("SFT on teacher greedy answers (no plugin)", None, "teacher_answers"),
    "supkd": ("supervised KD on teacher answers, lmbda 0", {"lmbda": 0.0, "beta": 0.5}, "teacher_answers"),
}


def log(msg: str) -> None:
    print(f"[real_model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Scheduler:
    """Jobs with dependencies run by ``workers`` threads, lowest priority number first."""

    def __init__(self, workers: int):
        self.workers, self.jobs, self.done, self.failed = workers, {}, set(), set()
        self.cv = threading.Condition()

    def add(self, name, fn, deps=(), priority=0):
        self.jobs[name] = (fn, tuple(deps), priority)

    def run(self):
        pending = dict(self.jobs)
        running: set[str] = set()

        def worker():
            while True:
                with self.cv:
                    while True:
                        blocked = [n for n, (_, d, _) in pending.items() if any(x in self.failed for x in d)]
                        for n in blocked:  # a failed dependency fails its dependents
                            pending.pop(n)
                            self.failed.add(n)
                            log(f"{n}: skipped (a dependency failed)")
                        ready = sorted((p, n) for n, (_, d, p) in pending.items() if all(x in self.done for x in d))
                        if ready:
                            name = ready[0][1]
                            fn = pending.pop(name)[0]
                            running.add(name)
                            break
                        if not pending:
                            self.cv.notify_all()
                            return
                        self.cv.wait()
                t0 = time.monotonic()
                ok = True
                try:
                    fn()
                except Exception:  # noqa: BLE001 - one job's failure must not hide the others
                    ok = False
                    log(f"{name}: FAILED\n{traceback.format_exc()[-3000:]}")
                with self.cv:
                    running.discard(name)
                    (self.done if ok else self.failed).add(name)
                    log(f"{name}: {'done' if ok else 'failed'} in {time.monotonic() - t0:.0f}s")
                    self.cv.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def write_chats(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for q, a in rows:
            msgs = [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a is not None else [])
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher", default=str(TEACHER))
    ap.add_argument("--arms", default="onpolicy,sft", help=f"comma list of {list(ARM_SPECS)}")
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-new", type=int, default=48, help="max completion tokens (training and evaluation)")
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None, help="train prompts (default: all the rest)")
    ap.add_argument("--keep", default=",".join(map(str, KEEP)), help="teacher layers the student keeps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=60.0, help="training runs are killed at this deadline")
    ap.add_argument("--smoke", action="store_true", help="3 steps, 8 held-out and 16 train prompts, 16 tokens")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.n_eval, args.n_train, args.max_new = 3, 8, 16, 16
        args.micro_batch, args.accum, args.gen_batch = 2, 2, 8
    return args


def main(argv=None) -> int:
    args = parse(argv)
    t_start = time.monotonic()
    import torch

    torch.set_num_threads(1)
    # imported here, in the main thread: a lazy `from transformers import ...` in two worker
    # threads at once failed (ImportError)
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import arms as qarms  # experiments/quality/arms.py
    import models
    import prompts as prompts_mod
    import tables
    from rouge import rouge_l

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    keep = [int(x) for x in args.keep.split(",")]
    train_q, eval_q = prompts_mod.split(args.n_eval, seed=args.seed)
    if args.n_train:
        train_q = train_q[: args.n_train]
    selected = [a for a in args.arms.split(",") if a]
    unknown = set(selected) - set(ARM_SPECS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known {list(ARM_SPECS)}")
    deadline = t_start + args.budget_min * 60
    paths = {"teacher": args.teacher, "student": str(out / "assets" / "student"),
             "prompts": write_chats(out / "assets" / "train_prompts.jsonl", [(q, None) for q in train_q]),
             "teacher_answers": str(out / "assets" / "teacher_answers.jsonl")}
    state: dict = {"timings": {}, "rows": {}}
    lock = threading.Lock()
    log(f"{len(selected)} arms x {args.steps} steps of {args.micro_batch}x{args.accum}; {len(train_q)} train, "
        f"{len(eval_q)} held-out prompts; student keeps {len(keep)} layers; output {out}")

    teacher_cache: dict = {}

    def teacher():
        with lock:
            if "m" not in teacher_cache:
                teacher_cache["m"] = models.load(args.teacher)
            return teacher_cache["m"]

    def timed(key, fn):
        def job():
            t0 = time.monotonic()
            fn()
            state["timings"][key] = time.monotonic() - t0
        return job

    def prune():
        models.prune(args.teacher, keep, paths["student"])

    def teacher_train_answers():
        tm, tok = teacher()
        ans = models.greedy(tm, tok, train_q, args.max_new, args.gen_batch)
        write_chats(Path(paths["teacher_answers"]), [(q, a["text"]) for q, a in zip(train_q, ans)])
        state["teacher_train_tokens"] = [len(a["ids"]) for a in ans]

    def evaluate(key, label, model_dir=None):
        tm, tok = teacher()
        if model_dir is None:
            ans = state["teacher_eval"]
        else:
            sm, _ = models.load(model_dir)
            ans = models.greedy(sm, tok, eval_q, args.max_new, args.gen_batch)
            del sm
        lp = models.teacher_logprob(tm, tok, eval_q, [a["ids"] for a in ans], args.gen_batch)
        refs = state["teacher_eval"]
        per = {"rouge_l": [rouge_l(a["text"], r["text"]) for a, r in zip(ans, refs)],
               "teacher_logprob": lp,
               "length": [len(a["ids"]) for a in ans],
               "stopped": [float(bool(a["ids"]) and a["ids"][-1] == models.EOS) for a in ans]}
        row = state["rows"].setdefault(key, {"key": key, "label": label})
        row.update(metrics=tables.summarize(per), per_prompt=per, answers=[a["text"] for a in ans])
        m = row["metrics"]
        log(f"{key}: ROUGE-L {m['rouge_l']['mean']:.3f} ± {m['rouge_l']['se']:.3f}, teacher log-lik "
            f"{m['teacher_logprob']['mean']:.3f} ± {m['teacher_logprob']['se']:.3f}")

    def teacher_eval():
        tm, tok = teacher()
        state["teacher_eval"] = models.greedy(tm, tok, eval_q, args.max_new, args.gen_batch)
        evaluate("teacher", "teacher (SmolLM2-135M-Instruct)")

    def train_arm(name):
        label, gold, data = ARM_SPECS[name]
        arm = qarms.Arm(name, label, gold, data=data, extra={"logging_steps": 1})
        workdir = out / "runs" / name
        # a checkpoint half-way too: an arm stopped at the deadline is still scored (at fewer steps)
        cfg = qarms.config(arm, paths, workdir, steps=args.steps, save_every=max(1, args.steps // 2),
                           micro_batch=args.micro_batch, accum=args.accum, lr=args.lr, max_completion=args.max_new,
                           sequence_len=128, seed=args.seed, cuda=False)
        rc, wall = qarms.launch(cfg, workdir, deadline, None)
        row = state["rows"].setdefault(name, {"key": name, "label": label})
        row.update(wall_s=wall, status="ok" if rc == 0 else f"rc {rc}")
        ckpts = qarms.checkpoints(Path(cfg["output_dir"]))
        if rc != 0 or not ckpts:
            text = (workdir / "log.txt").read_text(errors="replace")
            row["reason"] = qarms.last_error(text)
            raise RuntimeError(f"{name}: {row['status']}: {row['reason']}")
        step, ckpt = ckpts[-1]
        row.update(steps=step, checkpoint=str(ckpt))
        hist = json.loads((ckpt / "trainer_state.json").read_text()).get("log_history", [])
        row["loss"] = [h["loss"] for h in hist if "loss" in h]
        scored = [h["gold/scored_tokens"] for h in hist if "gold/scored_tokens" in h]
        if gold is not None and scored:
            row["trained_tokens"] = float(sum(scored))
        else:  # SFT: the teacher answers it read (completion tokens, closing turn end included)
            row["trained_tokens"] = float(sum(state["teacher_train_tokens"]) / len(state["teacher_train_tokens"])
                                          * step * args.micro_batch * args.accum)
        runtime = [h.get("train_runtime") for h in hist if "train_runtime" in h]
        row["train_runtime_s"] = runtime[-1] if runtime else None
        log(f"{name}: trained {step} steps in {wall:.0f}s wall; losses {row['loss'][:2]} ... {row['loss'][-2:]}")

    sch = Scheduler(args.workers)
    sch.add("prune", timed("prune", prune), priority=0)
    sch.add("teacher_train_answers", timed("teacher_train_answers", teacher_train_answers), priority=1)
    sch.add("teacher_eval", timed("teacher_eval", teacher_eval), priority=4)
    sch.add("eval_student", timed("eval_student", lambda: evaluate("student", "student before training",
                                                                   paths["student"])),
            deps=("prune", "teacher_eval"), priority=5)
    for i, name in enumerate(selected):
        needs = ("prune",) + (("teacher_train_answers",) if ARM_SPECS[name][2] == "teacher_answers" else ())
        sch.add(f"train_{name}", timed(f"train_{name}", lambda n=name: train_arm(n)), deps=needs,
                priority={"onpolicy": 1, "sft": 2, "supkd": 3}.get(name, 3))
        sch.add(f"eval_{name}", timed(f"eval_{name}", lambda n=name: evaluate(
            n, ARM_SPECS[n][0], state["rows"][n]["checkpoint"])), deps=(f"train_{name}", "teacher_eval"),
            priority=6)
    sch.run()

    # the table
    rows = []
    ref = state["rows"]
    order = ["teacher", "student"] + selected
    for key in order:
        if key not in ref:
            rows.append({"key": key, "label": ARM_SPECS.get(key, (key,))[0], "status": "failed"})
            continue
        row = ref[key]
        if key not in ("teacher", "student") and row.get("metrics") and ref.get("student", {}).get("metrics") \
                and ref.get("teacher", {}).get("metrics"):
            for metric, gkey in (("rouge_l", "gap_rouge"), ("teacher_logprob", "gap_logprob")):
                s0, t = ref["student"]["metrics"][metric]["mean"], ref["teacher"]["metrics"][metric]["mean"]
                row[gkey] = None if abs(t - s0) < 1e-9 else (row["metrics"][metric]["mean"] - s0) / (t - s0)
        rows.append(row)
    t_cfg = AutoConfig.from_pretrained(args.teacher)
    n_teacher = sum(p.numel() for p in teacher()[0].parameters())
    per_layer = sum(p.numel() for p in teacher()[0].model.layers[0].parameters())
    state["timings"]["total"] = time.monotonic() - t_start
    result = {
        "rows": rows,
        "models": {"teacher_layers": t_cfg.num_hidden_layers, "teacher_params": n_teacher, "student_keep": keep,
                   "student_params": n_teacher - per_layer * (t_cfg.num_hidden_layers - len(keep))},
        "settings": {"steps": args.steps, "window": args.micro_batch * args.accum, "micro_batch": args.micro_batch,
                     "accum": args.accum, "lr": args.lr, "max_new": args.max_new, "n_eval": len(eval_q),
                     "n_train": len(train_q), "seed": args.seed, "smoke": args.smoke, "workers": args.workers,
                     "machine": f"CPU, {os.cpu_count()} cores, 1 torch thread per process"},
        "samples": {"prompts": eval_q[:4]},
        "eval_prompts": eval_q,
        "timings": {k: round(v, 1) for k, v in state["timings"].items()},
        "failed": sorted(sch.failed),
    }
    md = tables.markdown(result)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=lambda o: None if o != o else o))
    print(md)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}; total {state['timings']['total']:.0f}s")
    return 0 if not sch.failed else 1


if __name__ == "__main__":
    sys.exit(main())
