#!/usr/bin/env bash
# Creates .venv with the verified stack (see ../shared/ENVIRONMENT.md) and installs
# this package in it. Quick when nothing changed: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.gold-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch 2.13 (CPU) + axolotl 0.19 into .venv (first run: ~4 min)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0" "axolotl==0.19.0"
  # DeepSpeed ships as a source package; built without its compiled ops (they build
  # just in time where used), it also runs on the CPU for the ZeRO-3 tests
  DS_BUILD_OPS=0 .venv/bin/pip install -q --no-build-isolation "deepspeed>=0.18.6,<0.19" hjson msgpack py-cpuinfo ninja
  .venv/bin/pip install -q -e ".[tests]"
  rm -f .venv/.gold-setup-*
  touch "$stamp"
fi
