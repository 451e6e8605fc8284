"""Run `axolotl train` in a subprocess on a YAML built from a dict."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def gold_config(pair: dict, out: Path, **overrides) -> dict:
    cfg = {
        "base_model": pair["student"],
        "plugins": ["axolotl_gold.GoldPlugin"],
        "teacher_model": pair["teacher"],
        "lmbda": 1.0,
        "beta": 0.5,
        "temperature": 1.0,
        "max_completion_length": 12,
        "num_generations": 2,
        "datasets": [{"path": pair["train"], "ds_type": "json", "type": "chat_template"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(out / "out"),
        "dataset_prepared_path": str(out / "prepared"),
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_steps": 3,
        "save_safetensors": True,
        "val_set_size": 0,
        "seed": 7,
        "dataset_num_proc": 1,
        "dataloader_num_workers": 0,
    }
    return with_overrides(cfg, overrides)


def with_overrides(cfg: dict, overrides: dict) -> dict:
    """``cfg`` updated by ``overrides``; a None value removes the key."""
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def run_train(cfg: dict, workdir: Path, num_processes: int = 1, timeout: int = 600):
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # a process group of the calling process (e.g. an in-process vLLM) is not the child's
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_HUB_OFFLINE="1",
        AXOLOTL_DO_NOT_TRACK="1",
        WANDB_MODE="disabled",
        TRL_EXPERIMENTAL_SILENCE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        # axolotl launches `accelerate` from PATH: use this interpreter's environment
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if num_processes == 1:
        if torch.cuda.device_count() > 1:  # `axolotl train` launches one process per visible GPU
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = [str(BIN / "axolotl"), "train", str(path)]
    elif torch.cuda.device_count() >= num_processes:
        # as users run it: `axolotl train` launches `accelerate launch`, one process per GPU
        # (Axolotl sets ACCELERATE_USE_DEEPSPEED / _FSDP from the YAML); a port per run so
        # that concurrent runs do not meet
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(num_processes))
        cmd = [str(BIN / "axolotl"), "train", str(path), "--",
               "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        # torchrun sets RANK/WORLD_SIZE. On GPUs accelerate picks NCCL by itself. On CPUs,
        # with ACCELERATE_USE_CPU accelerate runs DDP over gloo, and a DeepSpeed run goes
        # through DeepSpeed's CPU accelerator (gloo) instead.
        entry = ["-m", "axolotl.cli.train"]
        if cfg.get("deepspeed"):
            env["ACCELERATE_USE_DEEPSPEED"] = "true"
            if not torch.cuda.is_available():
                entry = [str(Path(__file__).with_name("cpu_deepspeed_train.py"))]
        elif not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
            if cfg.get("fsdp_config"):  # Accelerate keeps FSDP for accelerators: see the launcher
                entry = [str(Path(__file__).with_name("cpu_fsdp2_train.py"))]
        cmd = [
            str(BIN / "torchrun"), "--nproc_per_node", str(num_processes),
            "--master_port", str(29500 + os.getpid() % 1000),
            *entry, str(path),
        ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir / "log.txt").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"axolotl train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(cfg["output_dir"])


def report(line: str) -> None:
    """Print a measured figure, and append it to GOLD_TEST_REPORT when set (test processes
    under pytest-xdist do not show their output)."""
    print(line, flush=True)
    path = os.environ.get("GOLD_TEST_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def windows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "gold_windows.jsonl").read_text().splitlines()]


def log_history(out: Path, step: int) -> list[dict]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return state["log_history"]


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def sgd_delta(pair, tmp_path, name, mbs, accum, procs, **extra):
    """Weights after one SGD step (lr 1, no clipping) minus before: minus the gradient of
    one off-policy window (``lmbda`` 0: the dataset's completions, no sampling)."""
    overrides = dict(
        lmbda=0.0, num_generations=1, micro_batch_size=mbs,
        gradient_accumulation_steps=accum, max_steps=1, save_steps=1, optimizer="sgd",
        learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, warmup_steps=0,
    )
    cfg = gold_config(pair, tmp_path / name, **{**overrides, **extra})
    out = run_train(cfg, tmp_path / name, num_processes=procs)
    before, after = weights(pair["student"]), weights(out)
    return {k: after[k] - before[k] for k in before}, windows(out)


def relative_l2(other: dict, ref: dict) -> float:
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in ref.values()))
    assert norm > 0
    return math.sqrt(sum(float((other[k] - ref[k]).double().pow(2).sum()) for k in ref)) / norm
