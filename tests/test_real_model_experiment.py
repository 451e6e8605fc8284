"""experiments/real_model (issue 17, section 2): the ROUGE-L it reports, its prompt split,
and a smoke run of the whole script (prune, teacher answers, on-policy GOLD and SFT through
`axolotl train`, scoring) on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments" / "real_model"
ASSET = REPO / ".assets" / "smollm2-135m-instruct"
sys.path.insert(0, str(EXP))

import prompts  # noqa: E402
from rouge import lcs_length, rouge_l  # noqa: E402


def test_lcs_length():
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert lcs_length(["a", "b", "c"], ["a", "b", "c"]) == 3
    assert lcs_length(["a", "x", "b"], ["b", "a"]) == 1


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("x y", "a b") == 0.0
    # LCS "the cat on mat" = 4 of 6 candidate, 4 of 5 reference tokens; case is ignored
    p, r = 4 / 6, 4 / 5
    assert math.isclose(rouge_l("The cat sat on the mat", "the cat lay on mat"), 2 * p * r / (p + r))
    # order matters (a subsequence, not a bag of words)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)


def test_prompt_split_is_disjoint_and_fixed():
    train, held = prompts.split(100, seed=0)
    assert len(held) == 100 and len(train) >= 200
    assert not set(train) & set(held)
    assert prompts.split(100, seed=0) == (train, held)


@pytest.mark.e2e
@pytest.mark.skipif(not (ASSET / ".complete").exists(), reason="needs .assets/smollm2-135m-instruct "
                    "(scripts/real_model.py)")
def test_real_model_experiment_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(EXP / "run.py"), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", "student", "onpolicy", "sft"}
    assert rows["teacher"]["metrics"]["rouge_l"]["mean"] == 1.0
    for key in ("student", "onpolicy", "sft"):
        m = rows[key]["metrics"]
        assert m["rouge_l"]["n"] == 8 and 0.0 <= m["rouge_l"]["mean"] <= 1.0
        assert m["teacher_logprob"]["mean"] < 0
    # the pruned student starts clearly below the teacher on both measures
    assert rows["student"]["metrics"]["rouge_l"]["mean"] < 0.5
    assert rows["student"]["metrics"]["teacher_logprob"]["mean"] < rows["teacher"]["metrics"]["teacher_logprob"]["mean"]
    for key in ("onpolicy", "sft"):
        assert rows[key]["steps"] == 3 and rows[key]["trained_tokens"] > 0
        assert all(math.isfinite(x) for x in rows[key]["loss"])
    assert "| on-policy GOLD" in (tmp_path / "results.md").read_text()
