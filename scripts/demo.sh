#!/usr/bin/env bash
# The demo: build a small teacher that solves a synthetic task and a weaker student
# (locally, from scratch), distill with `axolotl train`, print the scores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
CFG=example_yamls/gold_demo.yaml DEMO=.demo BUILD_FLAGS=""
if [ "${1:-}" = "--cross-tokenizer" ]; then
  CFG=example_yamls/gold_demo_cross_tokenizer.yaml DEMO=.demo-x BUILD_FLAGS="--cross-tokenizer"
fi
.venv/bin/python -m axolotl_gold.demo build "$DEMO" $BUILD_FLAGS
rm -rf "$DEMO/run"
start=$(date +%s)
.venv/bin/axolotl train "$CFG" 2>&1 | tee "$DEMO/train.log" | grep -oE "\{'loss': '[^']*'|Training completed.*|Error.*" || true
[ -f "$DEMO/run/config.json" ] || [ -f "$DEMO/run/adapter_config.json" ] || { echo "training failed: see $DEMO/train.log"; exit 1; }
echo "[demo] distillation took $(( $(date +%s) - start )) s"
.venv/bin/python -m axolotl_gold.demo report --teacher "$DEMO/teacher" --before "$DEMO/student" \
  --after "$DEMO/run" --eval "$DEMO/data/eval.jsonl"
