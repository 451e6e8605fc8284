"""The headline GOLD benchmark through the CLI: bench_vs_reference.py's plain loop over our
stages and `axolotl train` on the same configuration, in one table.

Same random-weight Qwen2-shaped models (bench_vs_reference's builders, saved once under
--cache-dir), lmbda 1, beta 0.5, sampling temperature 0.9 / top_p 0.95, loss temperature
0.9, micro batch x accumulation, every rollout forced to --completion tokens. The CLI reads
prompts from a jsonl of chat rows (--prompt letters, one token each: see byte_tokenizer)
with 4 rollouts per prompt; the plain loop samples as many distinct prompts. Each row runs
in its own process, all with the same OMP_NUM_THREADS (accelerate's default, 1):
  plain loop     bench_vs_reference.run_ours: StaticCacheEngine on CUDA, HF generate on the CPU
                 (what `gold_generation_engine: auto` picks in the trainer)
  axolotl train  a GOLD YAML (bf16 on CUDA, full fine-tune, logging_steps 1), `axolotl train`
                 in a subprocess as tests/axolotl_run.py runs it
  reference      TRL's GOLDTrainer (--with-reference only; ~70 s a step at full size)

`axolotl train`'s step time is the gap between consecutive per-step log lines on its stdout
(logging reads the loss with .item(), so it is device-synced): --warmup must be >= 1.
Generation, teacher and peak memory are the trainer's logs (gold/time_generation_s,
gold/time_teacher_s, max of gold/peak_memory_gib over all steps; on CUDA a second table of
gold/memory_at_window_gib, gold/peak_generation_gib and the step peak beside the plain
loop's same marks: which stage sets the peak), tokens gold/scored_tokens
(else gold_windows.jsonl). On every row: tokens/s = scored completion tokens / step wall
time, student = step - generation - teacher (student forward + backward, loss, optimizer),
means over the --steps measured steps.

The YAML has no key for fixed-length rollouts, so the benchmark's YAML also lists
`rollout_plugins.FixedLengthRollouts`, which sets the student engine's `min_new_tokens`
as bench_vs_reference does on its side; --free-length leaves it out.

--ragged (bench_vs_reference's flag; ragged.py): no forced lengths anywhere; the saved
models' generation_config lists a stop set sized for a mean completion of ~40% of
--completion (the trainer's stop set reads it), `rollout_plugins.RolloutLengths` records each
engine call's lengths, and the plain loop also runs forced ("plain loop (forced)") so a
second table gives the length distribution and the engine's time per generated token
against the forced run (the cost of rows that stopped).

--memory-at-peak (CUDA): `axolotl train` records CUDA's allocator during its last warm-up step
(`peak_allocations.PeakAllocations`) and a third table splits that step's peak: what was held when
the step began (student weights, gradients, optimizer state, teacher, the rest) and what the
step allocated that is alive at the peak, by the Python line that allocated it.

--profile-step: one step more after the measured ones runs under torch.profiler
(`rollout_plugins.StepProfile`, `step_profile.py`): the device's idle gaps inside it, with what the
host was doing, and every host wait for the device (scalar reads, synchronize calls) by the line
that asked for it, printed after the table.

GPU (device machine, after `bash scripts/device_bin.sh`; a few minutes):
  PYTHONPATH=/tmp/axsite:$PWD python3 benchmarks/bench_cli.py
CPU smoke test:
  source scripts/env.sh && .venv/bin/python benchmarks/bench_cli.py --tiny --device cpu
Other flags are bench_vs_reference's (--compile for gold_rollout_compile on both rows, --prompt, --completion, --micro-batch, --grad-accum,
--vocab, --gradient-checkpointing, --chunk-size, --seed, --warmup (here 2), --steps (here 4)).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a plain string template: the prompt's ids are exactly the benchmark's prompt tokens
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def peak_step(args) -> int:
    """The step --memory-at-peak records: the last warm-up step (recording slows it; the
    first one may compile)."""
    return max(args.warmup - 1, 0)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--with-reference", action="store_true", help="also run TRL's GOLDTrainer (slow)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--free-length", action="store_true", help="do not force fixed-length rollouts in `axolotl train`")
    p.add_argument("--student-compile", choices=("default", "reduce-overhead", "max-autotune"), default=None,
                   help="`axolotl train` with `torch_compile: true` and this `torch_compile_mode` (the plain loop stays eager; "
                        "reduce-overhead / max-autotune record CUDA graphs of the student)")
    p.add_argument("--skip-plain", action="store_true", help="`axolotl train` (and --with-reference) only")
    p.add_argument("--profile-step", action="store_true",
                   help="one more step after the measured ones, under torch.profiler: its idle gaps and host "
                        "waits (step_profile.py), printed after the table")
    p.add_argument("--nan-inf-filter", action="store_true",
                   help="HF's logging_nan_inf_filter back on in `axolotl train` (a host read of each "
                        "micro-step's loss; the GOLD trainer turns it off)")
    p.add_argument("--fuse-projections", choices=("default", "on", "off"), default="default",
                   help="`axolotl train` with `gold_rollout_fuse_projections` true / false (the decode step's q/k/v "
                        "and gate/up projections as one GEMM each); default: unset (as `gold_rollout_compile`)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="`axolotl train` with a LoRA student of this rank (`lora_target_linear`, dropout 0; Axolotl's "
                        "LoRA kernels as Axolotl sets them on CUDA, off on the CPU); needs --skip-plain (the plain "
                        "loop and the reference train the whole student). 0: a full fine-tune")
    p.add_argument("--memory-at-peak", action="store_true",
                   help="CUDA: record the allocator during `axolotl train`'s first measured step; print what is alive at its peak")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "gold_bench_models"))
    p.add_argument("--workdir", default=None, help="for the YAML, data, output and log (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per row")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    own, rest = p.parse_known_args(argv)
    if own.lora_r and (not own.skip_plain or own.with_reference):
        p.error("--lora-r needs --skip-plain and no --with-reference: those rows train the whole student")
    sys.path.insert(0, str(HERE))
    import bench_vs_reference as bvr

    shared = bvr.parse_args(["--warmup", "2", "--steps", "4", *rest])  # later flags win
    return own, shared, bvr


def model_dir(own, args, bvr) -> Path:
    device = "cuda" if args.device.startswith("cuda") else "cpu"  # the init draws on that device
    stops = f"-stops{len(bvr.stop_set(args))}" if args.ragged else ""  # the saved generation_config's
    return Path(own.cache_dir) / f"{'tiny' if args.tiny else 'full'}-v{args.vocab}-s{args.seed}-{device}{stops}"


def build(args, bvr, out: Path) -> dict:
    """The benchmark's student, teacher and tokenizer (with a chat template), saved."""
    import torch

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    student, teacher = bvr.build_models(args, torch.device(args.device), dtype)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(out / name)
        byte_tokenizer(args.vocab, bvr, str(out / name))
    (out / "done").write_text("ok")
    return {"built": str(out)}


def byte_tokenizer(vocab: int, bvr, out_dir: str):
    """bench_vs_reference's word-level tokenizer does not survive a save: transformers 5
    loads any tokenizer next to a qwen2 config.json as Qwen2Tokenizer (byte-level BPE from
    vocab and merges). So: the 256 byte symbols, unreachable fillers, and the same special
    ids (pad ``<|endoftext|>`` at V-3, eos ``<|im_end|>`` at V-1), no merges: one token per
    character of a prompt."""
    from axolotl_gold.demo.tokenizers import _bpe, _byte_alphabet, _finish, _qwen2_style

    pad, eos = bvr.special_ids(vocab)
    names = _byte_alphabet() + [f"<|filler_{i}|>" for i in range(256, vocab)]
    names[pad], names[pad + 1], names[eos] = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    tok = _qwen2_style(_bpe({n: i for i, n in enumerate(names)}, []))
    tok.add_special_tokens([names[pad], names[pad + 1], names[eos]])
    return _finish(tok, out_dir, CHAT_TEMPLATE, pad_token=names[pad], eos_token=names[eos])


def run_child(name: str, argv: list[str], timeout) -> dict:
    """Run this script as ``--child name`` and return what it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name, "--result", path]
    try:
        subprocess.run(cmd, check=False, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": threads()})
        with open(path) as f:
            return json.load(f)
    except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as error:
        return {"error": f"{name}: {type(error).__name__} (crashed or timed out)"}


def threads() -> str:
    """Every row's intra-op threads: `axolotl train` (accelerate launch) defaults to 1."""
    return os.environ.get("OMP_NUM_THREADS") or "1"


def child_main(own, args, bvr) -> None:
    try:
        if own.child == "build":
            result = build(args, bvr, model_dir(own, args, bvr))
        elif own.child == "reference":
            result = bvr.run_reference(args)
        else:
            args.ragged = args.ragged and own.child != "plain-forced"
            result = bvr.run_ours(args, "ours-fast" if args.device.startswith("cuda") else "ours-hf")
    except Exception as error:  # noqa: BLE001 - report it in the table
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    Path(own.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- axolotl train


def write_config(own, args, bvr, models: Path, work: Path) -> Path:
    import yaml

    cuda = args.device.startswith("cuda")
    window = args.micro_batch * args.grad_accum
    prompts = bvr.build_prompts(args, 2 * window * (args.warmup + args.steps))
    with open(work / "prompts.jsonl", "w") as f:
        for ids in prompts:
            text = "".join(chr(ord("a") + i % 26) for i in ids)  # one token per letter
            f.write(json.dumps({"messages": [{"role": "user", "content": text}]}) + "\n")
    cfg = {
        "base_model": str(models / "student"),
        "teacher_model": str(models / "teacher"),
        "plugins": ["axolotl_gold.GoldPlugin"] + (["rollout_plugins.RolloutLengths"] if args.ragged else [])
        + ([] if own.free_length or args.ragged else ["rollout_plugins.FixedLengthRollouts"])
        + (["peak_allocations.PeakAllocations"] if own.memory_at_peak else [])
        + (["rollout_plugins.NanInfFilter"] if own.nan_inf_filter else [])
        + (["rollout_plugins.StepProfile"] if own.profile_step else []),
        "lmbda": 1.0, "beta": 0.5, "temperature": 0.9, "top_p": 0.95, "top_k": 0, "loss_temperature": 0.9,
        "max_completion_length": args.completion, "num_generations": own.num_generations,
        "gold_loss_chunk_size": args.chunk_size,
        "datasets": [{"path": str(work / "prompts.jsonl"), "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(work / "prepared"), "dataset_num_proc": 1, "val_set_size": 0,
        "sequence_len": args.prompt + args.completion, "sample_packing": False,
        "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": args.grad_accum,
        "max_steps": args.warmup + args.steps + int(own.profile_step), "learning_rate": 1e-6, "lr_scheduler": "constant",
        "optimizer": "adamw_torch_fused" if cuda else "adamw_torch", "weight_decay": 0.01,  # torch AdamW's
        "bf16": cuda, "fp16": False, "tf32": False, "attn_implementation": "sdpa",
        "gradient_checkpointing": args.gradient_checkpointing,
        "output_dir": str(work / "out"), "save_strategy": "no", "logging_steps": 1,
        "seed": args.seed, "dataloader_num_workers": 0,
    }
    if args.gradient_checkpointing:
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if args.compile:
        cfg["gold_rollout_compile"] = True
    if own.fuse_projections != "default":
        cfg["gold_rollout_fuse_projections"] = own.fuse_projections == "on"
    if own.student_compile:
        cfg["torch_compile"] = True
        if own.student_compile != "default":
            cfg["torch_compile_mode"] = own.student_compile
    if args.generation_rows:
        cfg["gold_generation_rows"] = args.generation_rows
    if own.lora_r:
        cfg.update(adapter="lora", lora_r=own.lora_r, lora_alpha=2 * own.lora_r, lora_dropout=0.0,
                   lora_target_linear=True, learning_rate=1e-5)
        if not cuda:
            cfg.update(lora_kernels_off())
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lora_kernels_off() -> dict:
    """Axolotl's LoRA kernels are CUDA-only and on by default."""
    return {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}


def parse_log_line(line: str) -> dict | None:
    """A per-step log dict printed by the trainer (``{'loss': ..., 'gold/...': ...}``)."""
    if "gold/time_generation_s" not in line or "{" not in line:
        return None
    try:
        logs = ast.literal_eval(line[line.index("{"): line.rindex("}") + 1])
    except (ValueError, SyntaxError):
        return None
    out = {}
    for key, value in logs.items():
        try:
            out[key] = float(value)  # the printer formats floats as strings
        except (TypeError, ValueError):
            pass
    return out


def run_cli(own, args, bvr, models: Path) -> dict:
    work = Path(own.workdir or tempfile.mkdtemp(prefix="gold_bench_cli_"))
    work.mkdir(parents=True, exist_ok=True)
    path = write_config(own, args, bvr, models, work)
    cuda = args.device.startswith("cuda")
    lengths = work / "lengths.jsonl"
    lengths.unlink(missing_ok=True)
    peak = work / "peak_allocations.json"
    peak.unlink(missing_ok=True)
    env = {"GOLD_BENCH_LENGTHS": str(lengths)} if args.ragged else {}
    if own.memory_at_peak:
        env.update(GOLD_BENCH_PEAK_OUT=str(peak), GOLD_BENCH_PEAK_STEP=str(peak_step(args)))
    profile = work / "step_profile.txt"
    profile.unlink(missing_ok=True)
    if own.profile_step:  # the step after the measured ones: its profiling slows nothing timed
        env.update(GOLD_BENCH_PROFILE_OUT=str(profile), GOLD_BENCH_PROFILE_STEP=str(args.warmup + args.steps))
    row = train(path, work, cuda=cuda, min_new_tokens=0 if args.ragged else args.completion,
                warmup=args.warmup, steps=args.steps, timeout=own.timeout, env=env or None)
    if peak.exists():
        row["memory_at_peak"] = json.loads(peak.read_text())
    if profile.exists():
        row["step_profile"] = profile.read_text()
    if args.ragged and "error" not in row:
        calls = [json.loads(line) for line in lengths.read_text().splitlines()]
        row["windows"] = calls[args.warmup: args.warmup + args.steps]
        row["engine"] = ("static-compiled" if args.compile else "static") if cuda else "hf"  # `auto`'s pick
        row["slots"] = args.generation_rows
    return row


def train(path: Path, work: Path, cuda: bool, min_new_tokens: int, warmup: int, steps: int,
          timeout: float | None = None, env: dict | None = None, gpus: str = "0",
          port: int = 29500) -> dict:
    """`axolotl train path` in a subprocess (log under ``work``), one process per GPU of
    ``gpus`` (CUDA_VISIBLE_DEVICES; several: `accelerate launch` on ``port``); the mean of
    steps ``warmup..warmup+steps-1`` as ``summarize`` gives it."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    extra_env, env = env, {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads(),
        PYTHONUNBUFFERED="1",  # log lines arrive when printed
        GOLD_BENCH_MIN_NEW_TOKENS=str(min_new_tokens),
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # accelerate, as tests do
        **(extra_env or {}),
    )
    env["CUDA_VISIBLE_DEVICES"] = gpus if cuda else ""
    axolotl = Path(sys.executable).parent / "axolotl"  # next to this interpreter, as tests use it
    cmd = [str(axolotl) if axolotl.exists() else shutil.which("axolotl") or "axolotl", "train", str(path)]
    processes = len(gpus.split(",")) if cuda else 1
    if processes > 1:
        cmd += ["--", "--num_processes", str(processes), "--main_process_port", str(port)]
    logs, stamps = [], []
    start = time.perf_counter()
    with open(work / "log.txt", "w") as log, subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            entry = parse_log_line(line)
            if entry is not None:
                stamps.append(time.perf_counter())
                logs.append(entry)
                print(f"[axolotl train] step {len(logs) - 1}: {line.strip()[:400]}", flush=True)
            if timeout and time.perf_counter() - start > timeout:
                proc.kill()
                break
        rc = proc.wait()
    total = warmup + steps
    if rc != 0 or len(logs) < total:
        tail = (work / "log.txt").read_text()[-3000:]
        print(tail, flush=True)
        return {"error": f"`axolotl train` exit {rc}, {len(logs)}/{total} steps logged; log: {work / 'log.txt'}"}
    if "gold/scored_tokens" not in logs[0]:
        windows = [json.loads(l) for l in (work / "out" / "gold_windows.jsonl").read_text().splitlines()]
        for entry, window in zip(logs, windows):
            entry["gold/scored_tokens"] = window["scored_tokens"]
    records = []
    for i in range(warmup, total):  # step i's wall time: log line i-1 to log line i
        entry = logs[i]
        records.append({"step": stamps[i] - stamps[i - 1], "generation": entry["gold/time_generation_s"],
                        "teacher": entry["gold/time_teacher_s"], "tokens": entry["gold/scored_tokens"],
                        "logged_student": entry.get("gold/time_student_s"),
                        **{mark: entry[key] for mark, key in LOGGED_MARKS.items() if key in entry}})
    peaks = [e["gold/peak_memory_gib"] for e in logs if "gold/peak_memory_gib" in e]
    row = summarize(records)
    row["peak_gib"] = max(peaks) if peaks else None  # every step, warm-up included
    row["log"] = str(work / "log.txt")
    row["logged_student_s"] = sum(r["logged_student"] or 0 for r in records) / len(records)
    return row


# the trainer's per-step memory logs, under bench_setup.MemoryMarks' names
LOGGED_MARKS = {"at_window_gib": "gold/memory_at_window_gib", "peak_generation_gib": "gold/peak_generation_gib",
                "peak_step_gib": "gold/peak_memory_gib"}


def summarize(records: list[dict]) -> dict:
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    step, gen, teacher, tokens = mean("step"), mean("generation"), mean("teacher"), mean("tokens")
    row = {"step_s": step, "generation_s": gen, "teacher_s": teacher, "student_s": step - gen - teacher,
           "tokens_per_step": tokens, "tokens_per_s": tokens / step if step > 0 else 0.0,
           "all_steps_s": [round(r["step"], 3) for r in records]}
    for mark in LOGGED_MARKS:
        if all(mark in r for r in records):
            row[mark] = mean(mark)
    return row


# ---------------------------------------------------------------- table and driver


def fmt(value, spec: str = "{:.2f}") -> str:
    return "n/a" if value is None else spec.format(value)


def table(rows: list[tuple[str, dict]], own, args) -> str:
    base = dict(rows).get("plain loop", {}).get("tokens_per_s")
    lines = [
        f"device {args.device}; student {'tiny' if args.tiny else '~0.5B'}, teacher {'tiny' if args.tiny else '~1.5B'}, "
        f"vocab {args.vocab}; prompt {args.prompt} + completion {args.completion} tokens "
        f"({'ragged' if args.ragged else 'fixed' if not own.free_length else 'free in axolotl train'}); micro batch {args.micro_batch} x grad accum "
        f"{args.grad_accum}, {own.num_generations} rollouts per prompt in axolotl train; lmbda 1, beta 0.5; gradient "
        f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; mean of {args.steps} step(s) after {args.warmup} warm-up",
        "",
        "| run | tokens/s | generation s | teacher s | student s | step s | completion len | peak GiB | tokens/s vs plain loop |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    window = args.micro_batch * args.grad_accum
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['generation_s']:.2f} | {r['teacher_s']:.2f} | {r['student_s']:.2f} "
            f"| {r['step_s']:.2f} | {r['tokens_per_step'] / window:.1f} | {fmt(r.get('peak_gib'))} | {ratio} |"
        )
    if any("peak_step_gib" in r for _, r in rows):
        lines += ["", "| run | allocated at window start GiB | peak through generation GiB | step peak GiB |",
                  "| --- | ---: | ---: | ---: |"]
        for name, r in rows:
            if "peak_step_gib" in r:
                lines.append(f"| {name} | {fmt(r.get('at_window_gib'))} | {fmt(r.get('peak_generation_gib'))} "
                             f"| {fmt(r.get('peak_step_gib'))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, args, bvr = parse_args(argv)
    if own.child:
        child_main(own, args, bvr)
        return
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: a logged step's wall time needs the log line before it")
    models = model_dir(own, args, bvr)
    if not (models / "done").exists():
        built = run_child("build", argv, own.timeout)
        if "error" in built:
            raise SystemExit(f"building the models failed: {built['error']}")
    rows = [] if own.skip_plain else [("plain loop", run_child("plain", argv, own.timeout))]
    if args.ragged and not own.skip_plain:
        rows.append(("plain loop (forced)", run_child("plain-forced", argv, own.timeout)))
    rows.append(("axolotl train", run_cli(own, args, bvr, models)))
    if own.with_reference:
        rows.append(("reference", run_child("reference", argv, own.timeout)))
    for name, r in rows:
        print(f"[{name}] {json.dumps(r)}", flush=True)
    print("\n" + table(rows, own, args), flush=True)
    if args.ragged and not own.skip_plain:
        import ragged

        forced = dict(rows)["plain loop (forced)"]
        compared = [(name, r, forced if name != "reference" else None) for name, r in rows if "forced" not in name]
        print("\n" + ragged.report(compared, args.completion, args.vocab, len(bvr.stop_set(args))), flush=True)
    peak = dict(rows)["axolotl train"].get("memory_at_peak")
    if peak:
        from peak_allocations import peak_table

        print(f"\n`axolotl train`, step {peak_step(args)} (the last warm-up step)\n\n" + peak_table(peak), flush=True)
    profiled = dict(rows)["axolotl train"].get("step_profile")
    if profiled:
        print("\n" + profiled, flush=True)
    if own.json:
        Path(own.json).write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
