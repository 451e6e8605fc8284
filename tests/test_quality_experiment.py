"""The quality experiment's pipeline (experiments/quality/run.py), tiny, on the CPU.

Builds the tiny teacher/students and data, runs three representative arms through the
real `axolotl train` CLI (on-policy GOLD, plain SFT without the plugin, cross-tokenizer
hybrid ULD), scores their checkpoints and writes the table, the JSON and the plot.
Numbers are meaningless at this size; the pipeline is what is tested (~2-3 min on 2 cores).
`python experiments/quality/run.py --tiny --device cpu --out DIR` runs every arm.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARMS = ("onpolicy", "sft", "xtok_hybrid")


def test_quality_experiment_tiny(tmp_path):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    out = tmp_path / "quality"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "quality" / "run.py"), "--tiny", "--device", "cpu",
         "--out", str(out), "--arms", ",".join(ARMS), "--budget-min", "15"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    assert {a["name"] for a in result["arms"]} == set(ARMS)
    steps = result["settings"]["steps"]
    for arm in result["arms"]:
        assert arm["status"] == "ok", arm
        assert arm["steps"] == steps
        assert [s for s, _ in arm["curve"]] == list(range(0, steps + 1, result["settings"]["save_every"]))
        assert 0.0 <= arm["accuracy"] <= 1.0
    ref = result["reference"]
    assert ref["teacher"]["n"] == 32 and {"student", "student_bpe"} <= set(ref)
    # GOLD arms ran the plugin; the SFT arm ran plain Axolotl
    assert (out / "runs" / "onpolicy" / "out" / "gold_windows.jsonl").exists()
    assert (out / "runs" / "xtok_hybrid" / "out" / "gold_windows.jsonl").exists()
    assert not (out / "runs" / "sft" / "out" / "gold_windows.jsonl").exists()
    md = (out / "quality.md").read_text()
    assert "| onpolicy |" in md and "gap closed" in md
    assert Path(result["plot"]).exists()
