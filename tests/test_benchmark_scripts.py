"""The benchmark scripts that drive `axolotl train` still run end to end (tiny shapes, CPU), so
the figures in the README can be reproduced with the code as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_real_sizes_runs_a_quantized_teacher_beside_a_lora_student(tmp_path):
    out = tmp_path / "real_sizes.json"
    stdout = _run(["benchmarks/real_sizes.py", "--tiny", "--device", "cpu", "--prompt", "16", "--completion", "24",
                   "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work"), "--json", str(out)],
                  tmp_path)
    result = json.loads(out.read_text())
    assert result["measured"]["tokens_per_s"] > 0
    assert result["measured"]["tokens_per_step"] == 4 * 24  # 1 x 4 rollouts forced to full length
    assert set(result["model"]["parts"]) >= {"teacher (nf4)", "KV cache", "loss chunk"}
    assert "| tokens/s |" in stdout
    config = (tmp_path / "work" / "cfg.yaml").read_text()
    assert "load_in_4bit: true" in config and "adapter: lora" in config


def test_bench_cli_runs_the_plain_loop_and_axolotl_train(tmp_path):
    out = tmp_path / "bench_cli.json"
    _run(["benchmarks/bench_cli.py", "--tiny", "--device", "cpu", "--compile", "--steps", "2",
          "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work"), "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    for name in ("plain loop", "axolotl train"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["tokens_per_s"] > 0
    assert "gold_rollout_compile: true" in (tmp_path / "work" / "cfg.yaml").read_text()
