"""The experiment's arms: one `axolotl train` YAML each, launched as subprocesses.

Every arm trains the same warmed-up student for the same number of optimizer steps on
windows of the same size (``micro_batch_size * gradient_accumulation_steps`` sequences
of one completion each, ``num_generations: 1``), at the same learning rate and
schedule, saving a checkpoint every ``save_every`` steps. So the arms see equal
numbers of student training sequences and, completions being of a fixed length,
about equal tokens; they differ only in where the completions come from and what
the student is trained to match:

=================  ==========================================================
``onpolicy``       GOLD, ``lmbda: 1``: the student's own samples, JSD ``beta: 0.5``
``onpolicy_fkl``   GOLD, ``lmbda: 1``, ``beta: 0`` (forward KL)
``onpolicy_rkl``   GOLD, ``lmbda: 1``, ``beta: 1`` (reverse KL)
``mixed``          GOLD, ``lmbda: 0.5``, ``beta: 0.5``
``seqkd``          GOLD, ``seq_kd: true``, ``lmbda: 0``: the teacher's samples, drawn
                   each window, scored with the teacher's full distributions
``supkd``          GOLD, ``lmbda: 0``: the data set's (ground-truth) completions
``sft``            plain Axolotl SFT (no plugin) on the teacher's samples
``xtok_hybrid``    cross-tokenizer student (BPE), ``use_uld_loss`` + ``uld_use_hybrid_loss``,
                   ``lmbda: 1``
``xtok_uld``       the same, plain sorted-L1 ULD
``xtok_sft``       the BPE student, plain SFT on the teacher's samples
=================  ==========================================================
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]  # axolotl_gold, importable in every `axolotl train`


@dataclass
class Arm:
    name: str
    label: str
    gold: dict | None  # GOLD keys; None: plain SFT without the plugin
    student: str = "student"  # an assets path key
    data: str = "train"  # an assets path key
    baseline: str = "student"  # whose starting accuracy the gap is measured from
    priority: int = 0  # lower runs first; dropped last when arms are trimmed
    extra: dict = field(default_factory=dict)


ARMS = [
    Arm("onpolicy", "on-policy JSD(0.5), lmbda 1", {"lmbda": 1.0, "beta": 0.5}, priority=0),
    Arm("sft", "SFT on teacher samples (no plugin)", None, data="teacher_samples", priority=1),
    Arm("supkd", "supervised KD, dataset completions, lmbda 0", {"lmbda": 0.0, "beta": 0.5}, priority=2),
    Arm("seqkd", "off-policy on teacher samples (seq_kd), lmbda 0", {"lmbda": 0.0, "beta": 0.5, "seq_kd": True},
        priority=3),
    Arm("mixed", "mixed JSD(0.5), lmbda 0.5", {"lmbda": 0.5, "beta": 0.5}, priority=4),
    Arm("onpolicy_fkl", "on-policy forward KL (beta 0)", {"lmbda": 1.0, "beta": 0.0}, priority=5),
    Arm("onpolicy_rkl", "on-policy reverse KL (beta 1)", {"lmbda": 1.0, "beta": 1.0}, priority=6),
    Arm("xtok_hybrid", "cross-tokenizer hybrid ULD, lmbda 1",
        {"lmbda": 1.0, "beta": 0.5, "use_uld_loss": True, "uld_use_hybrid_loss": True,
         # fixed weights, as example_yamls/gold_demo_cross_tokenizer.yaml
         "uld_hybrid_matched_weight": 1.0, "uld_hybrid_unmatched_weight": 1.0},
        student="student_bpe", baseline="student_bpe", priority=7),
    Arm("xtok_uld", "cross-tokenizer plain ULD, lmbda 1", {"lmbda": 1.0, "beta": 0.5, "use_uld_loss": True},
        student="student_bpe", baseline="student_bpe", priority=8),
    Arm("xtok_sft", "cross-tokenizer SFT on teacher samples", None, student="student_bpe", data="teacher_samples",
        baseline="student_bpe", priority=9),
]
ARM_NAMES = [a.name for a in ARMS]


def config(arm: Arm, paths: dict, workdir: Path, *, steps: int, save_every: int, micro_batch: int, accum: int,
           lr: float, max_completion: int, sequence_len: int, seed: int, cuda: bool) -> dict:
    cfg = {
        "base_model": paths[arm.student],
        "datasets": [{"path": paths[arm.data], "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(workdir / "prepared"),
        "val_set_size": 0,
        "sequence_len": sequence_len,
        "micro_batch_size": micro_batch,
        "gradient_accumulation_steps": accum,
        "max_steps": steps,
        "learning_rate": lr,
        "optimizer": "adamw_torch",
        "adam_beta2": 0.98,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": max(1, steps // 20),
        "seed": seed,
        "output_dir": str(workdir / "out"),
        "logging_steps": max(1, min(10, steps // 10)),
        "save_strategy": "steps",
        "save_steps": save_every,
        "save_only_model": True,
        "save_safetensors": True,
        "bf16": False,
        "fp16": False,
        "tf32": bool(cuda),
        "dataset_num_proc": 1,
        "dataloader_num_workers": 0,
    }
    if arm.gold is not None:
        cfg.update({
            "plugins": ["axolotl_gold.GoldPlugin"],
            "teacher_model": paths["teacher"],
            "temperature": 1.0,
            "max_completion_length": max_completion,
            "num_generations": 1,
            "gold_seed": seed,
            **arm.gold,
        })
    cfg.update(arm.extra)
    return cfg


def launch(cfg: dict, workdir: Path, deadline: float, gpu: str | None) -> tuple[int | str, float]:
    """`axolotl train` in its own process group, killed whole at ``deadline`` (monotonic).

    Returns (returncode or "timeout", wall seconds); the log goes to ``workdir/log.txt``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
        WANDB_MODE="disabled", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_DATASETS_CACHE=str(workdir / "hf_datasets"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # axolotl launches `accelerate`
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    )
    if gpu is not None:  # `axolotl train` launches one process per visible GPU
        env["CUDA_VISIBLE_DEVICES"] = gpu
    start = time.monotonic()
    with open(workdir / "log.txt", "w") as log:
        proc = subprocess.Popen([str(BIN / "axolotl"), "train", str(path)], cwd=workdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return rc, time.monotonic() - start


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every saved checkpoint, by step."""
    found = []
    for d in out.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-")[1])
        except ValueError:
            continue
        if any(d.glob("*.safetensors")):
            found.append((step, d))
    return sorted(found)


def last_error(log: str) -> str:
    import re

    for line in reversed(log.splitlines()):
        if "CalledProcessError" in line or "Warning" in line:
            continue
        if re.search(r"\b\w*(Error|Exception)\b.*:", line):
            return line.strip()[:300]
    return (log.strip().splitlines() or [""])[-1][:300]
