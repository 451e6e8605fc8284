#!/bin/bash
# On the GPU machine (carry .assets/smollm2-tokenizer, .assets/wheels, .axsite): the rollout
# engine's CUDA unit tests, benchmarks/profile_decode.py with torch.compile, then the GPU
# suite's cases named by GOLD_GPU_CASES through `axolotl train`. Everything lands in $OUT.
#
#   GOLD_GPU_CASES=full-bf16-static,compile bash scripts/gpu_speed.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_speed_out}
mkdir -p "$OUT"
bash scripts/device_bin.sh
for w in .assets/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/gpu_pytest; done
export PYTHONPATH=/tmp/axsite:$PWD:/tmp/gpu_pytest
if [ "${GOLD_SKIP_UNIT:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_static_engine.py tests/test_row_noise.py \
    tests/test_decode_attention.py tests/test_nucleus_sampling.py > "$OUT/cuda_tests.txt" 2>&1
  tail -15 "$OUT/cuda_tests.txt"
fi
if [ "${GOLD_SKIP_PROFILE:-0}" != 1 ]; then
  python3 benchmarks/profile_decode.py --compile --json "$OUT/profile_decode.json" > "$OUT/profile_decode.txt" 2>&1
  grep "^|" "$OUT/profile_decode.txt" | tail -20 || tail -30 "$OUT/profile_decode.txt"
fi
if [ -n "${GOLD_GPU_CASES:-}" ]; then
  bash scripts/gpu_suite.sh > "$OUT/gpu_suite.txt" 2>&1
  tail -5 "$OUT/gpu_suite.txt"
fi
