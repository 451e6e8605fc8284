"""Run the suite's cases as concurrent `axolotl train` subprocesses and check each one.

GPU time comes in commands of at most ~10 minutes, so all cases run at once on the one
GPU (GOLD_GPU_WORKERS at a time, default 10) and every case gets a result, a failure
included: a crash in one case must not hide the others. Cases not started before the
time budget (GOLD_GPU_BUDGET_S, default 480 s) are reported as not run, and running
ones are stopped at it ("stopped": not passed, and not a failure of the case either), so
the table is always written inside one command.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from gpu_cases import MAX_STEPS, Case, base_config, for_this_machine, missing_module, on_cpu
from axolotl_run import BIN, with_overrides

PASSING = ("passed", "clear-error")
RELOAD_LOCK = threading.Lock()  # one reloaded student in memory at a time


def launch(cfg: dict, workdir: Path, timeout: float, extra_env: dict | None = None) -> tuple[int | str, str]:
    """`axolotl train` in its own process group (killed whole on timeout): (returncode, log)."""
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)  # PYTHONPATH (the carried site) reaches the subprocess
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(workdir / "hf_datasets"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # axolotl launches `accelerate`
        **(extra_env or {}),
    )
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    log_path = workdir / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "axolotl"), "train", str(path)], cwd=workdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"timeout after {timeout:.0f} s"
    return rc, log_path.read_text(errors="replace")


def last_error(log: str) -> str:
    """The last exception line of a log (what the table shows for a failure), past the
    launcher's own ``CalledProcessError`` (`axolotl train` runs `accelerate launch`)."""
    for line in reversed(log.splitlines()):
        if "CalledProcessError" in line or "Warning" in line:
            continue
        if re.search(r"\b\w*(Error|Exception)\b.*:", line):
            return line.strip()[:300]
    return (log.strip().splitlines() or [""])[-1][:300]


def exit_verdict(case: Case, rc: int | str, log: str) -> tuple[str, str]:
    """Status and reason of a run that did not exit 0: "stopped" when the suite's deadline
    killed it (``launch``'s rc is then a string; not a verdict on the case, its log says how
    far it got), "clear-error" when a flash-attention case without flash-attn stops at
    Axolotl's own check naming `attn_implementation` (below pydantic's first line), else
    "failed"."""
    error = last_error(log)
    if isinstance(rc, str):
        return "stopped", f"exit {rc} (GOLD_GPU_BUDGET_S): {error}"
    named = re.search(r"set `?(attn_implementation|flash_attention)", log) is not None
    clear = case.flash and missing_module("flash_attn") is not None and named
    return ("clear-error" if clear else "failed"), f"exit {rc}: {error}"


def metrics(out: Path, log: str) -> tuple[list[dict], dict]:
    """The final checkpoint's log history and the per-step figures the table reports."""
    state = out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"] if state.exists() else []
    steps = [h for h in history if "loss" in h]
    found = {}
    for key in ("gold/time_generation_s", "gold/time_teacher_s", "gold/time_student_s", "gold/peak_memory_gib"):
        values = [h[key] for h in steps if key in h]
        if values:
            found[key] = sum(values) / len(values)
    memory = [h[k] for h in steps for k in h if k.startswith("memory/max_allocated")]
    if memory:
        found["memory/max_allocated_gib"] = max(memory)
    runtime = re.findall(r"'train_runtime':\s*'?([0-9.]+)", log)
    if runtime:
        found["s_per_step"] = float(runtime[-1]) / MAX_STEPS
    return history, found


def reload_and_forward(case: Case, pair: dict, out: Path) -> None:
    """The saved student loads (full weights, or the adapter on its base) and runs a forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if pair.get("kind") == "vlm" else AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with RELOAD_LOCK:
        if case.adapter:
            from peft import PeftModel

            assert (out / "adapter_config.json").exists(), "no adapter_config.json in the output"
            model = PeftModel.from_pretrained(auto.from_pretrained(pair["student"], dtype=torch.float32), str(out))
        else:
            model = auto.from_pretrained(str(out), dtype=torch.float32)
        model.to(device).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 20, 30, 40, 50]], device=device)).logits
        assert torch.isfinite(logits).all(), "non-finite logits from the reloaded student"
        del model


def saved_gc_kwargs(out: Path) -> dict | None:
    """``gradient_checkpointing_kwargs`` of the saved training args (a fresh interpreter:
    unpickling imports Axolotl's argument classes, which patch libraries)."""
    code = ("import json, sys, torch; a = torch.load(sys.argv[1], weights_only=False); "
            "print(json.dumps(a.gradient_checkpointing_kwargs))")
    path = out / f"checkpoint-{MAX_STEPS}" / "training_args.bin"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def check(case: Case, pair: dict, out: Path, history: list[dict]) -> list[str]:
    """What is wrong with a run that exited 0 (empty: nothing)."""
    problems = []
    losses = [h[k] for h in history for k in ("loss", "eval_loss") if k in h]
    if not any("loss" in h for h in history) or not any("eval_loss" in h for h in history):
        problems.append(f"no train or eval loss in checkpoint-{MAX_STEPS}/trainer_state.json")
    if not all(math.isfinite(l) for l in losses):
        problems.append(f"non-finite losses {losses}")
    skipped = [h.get("gold/skipped_steps", 0) for h in history if "loss" in h]
    if any(skipped):  # the trainer skipped a step with non-finite gradients (trainer.nonfinite)
        problems.append(f"steps skipped for non-finite gradients: gold/skipped_steps {skipped}")
    windows_file = out / "gold_windows.jsonl"
    records = [json.loads(l) for l in windows_file.read_text().splitlines()] if windows_file.exists() else []
    if [r["step"] for r in records] != list(range(MAX_STEPS)):
        problems.append(f"gold_windows.jsonl steps {[r['step'] for r in records]}")
    calls = [r["engine_calls"] for r in records if any(r["on_policy"])]
    if any(c != 1 for c in calls):
        problems.append(f"engine_calls per on-policy window {calls} (want 1)")
    if case.check_gc_kwargs is not None and (kwargs := saved_gc_kwargs(out)) != case.check_gc_kwargs:
        problems.append(f"saved gradient_checkpointing_kwargs {kwargs} (want {case.check_gc_kwargs})")
    try:
        reload_and_forward(case, pair, out)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"reload: {type(e).__name__}: {str(e)[:300]}")
    return problems


def notes(case: Case, log: str) -> list[str]:
    """What the run did besides the plan (engine fallbacks, flash-attn availability)."""
    found = sorted({m.strip()[:160] for m in re.findall(r"gold: the static generation engine cannot serve[^\n]*", log)})
    if case.flash:
        found.append("flash_attn " + ("importable" if missing_module("flash_attn") is None else "NOT importable"))
    return found


def run_case(case: Case, assets, root: Path, deadline: float) -> dict:
    result = {"case": case.name, "status": "failed", "wall_s": None, "reason": "", "notes": [], "tail": ""}
    reason = missing_module(case.needs)
    if reason or time.monotonic() > deadline:
        return {**result, "status": "skipped", "reason": reason or "not started: time budget spent"}
    workdir = root / case.name
    start = time.monotonic()
    try:
        pair = assets.get(case.models)
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = for_this_machine(case, with_overrides(base_config(pair, str(workdir)), dict(case.overrides)))
        rc, log = launch(cfg, workdir, deadline - time.monotonic())
        result.update(wall_s=round(time.monotonic() - start, 1), notes=notes(case, log))
        out = Path(cfg["output_dir"])
        history, found = metrics(out, log)
        result.update(found)
        if rc != 0:
            status, reason = exit_verdict(case, rc, log)
            result.update(status=status, reason=reason, tail=log[-6000:])
        else:
            problems = check(case, pair, out, history)
            result.update(status="failed" if problems else "passed", reason="; ".join(problems))
    except Exception as e:  # noqa: BLE001 - a harness error is this case's failure
        result.update(reason=f"harness: {type(e).__name__}: {e}", tail=traceback.format_exc()[-4000:])
    result["wall_s"] = result["wall_s"] or round(time.monotonic() - start, 1)
    for heavy in list(workdir.glob("**/*.safetensors")) + list(workdir.glob("**/*.pt")) + list(workdir.glob("**/*.bin")):
        heavy.unlink()  # keep logs and states; 30 cases of weights do not fit the disk
    return result


def run_all(cases: list[Case], assets, root: Path) -> dict[str, dict]:
    workers = int(os.environ.get("GOLD_GPU_WORKERS", "2" if on_cpu() else "10"))
    deadline = time.monotonic() + float(os.environ.get("GOLD_GPU_BUDGET_S", "480"))
    for group in dict.fromkeys(c.models for c in cases):  # build up front, in this thread
        try:
            assets.get(group)
        except RuntimeError as e:  # its cases fail with this error
            print(e)
    with ThreadPoolExecutor(workers) as pool:
        futures = {c.name: pool.submit(run_case, c, assets, root, deadline) for c in cases}
        return {name: f.result() for name, f in futures.items()}


def fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    head = "| case | status | wall s | s/step | gen s | teacher s | student s | peak GiB | notes / error |"
    rows = [head, "|" + "---|" * 9]
    for r in results.values():
        peak = r.get("gold/peak_memory_gib", r.get("memory/max_allocated_gib"))
        text = "; ".join([*r["notes"], r["reason"]] if r["reason"] else r["notes"]).replace("|", "\\|")
        rows.append(f"| {r['case']} | {r['status']} | {fmt(r['wall_s'], 0)} | {fmt(r.get('s_per_step'))} | "
                    f"{fmt(r.get('gold/time_generation_s'))} | {fmt(r.get('gold/time_teacher_s'))} | "
                    f"{fmt(r.get('gold/time_student_s'))} | {fmt(peak)} | {text[:400]} |")
    passed = sum(r["status"] in PASSING for r in results.values())
    return "\n".join(rows) + f"\n\n{passed} of {len(results)} cases passed\n"


def write_report(results: dict[str, dict], out_dir: Path, root: Path) -> str:
    """``gpu_suite.md`` / ``.json`` and the failed cases' full logs under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (out_dir / "gpu_suite.md").write_text(text)
    (out_dir / "gpu_suite.json").write_text(json.dumps(results, indent=1))
    for name, r in results.items():
        log = root / name / "log.txt"
        if r["status"] not in PASSING and log.exists():
            (out_dir / "gpu_logs").mkdir(exist_ok=True)  # the end of each: what comes back is limited
            (out_dir / "gpu_logs" / f"{name}.log").write_text(log.read_text(errors="replace")[-200_000:])
    return text
