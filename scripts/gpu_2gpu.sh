#!/bin/bash
# On the 2-GPU device machine (`nvidia-h200-x2`), from a clean export of HEAD (carry
# .clean/head.tar made by `git archive HEAD -o .clean/head.tar`, .assets and .axsite):
#   bash scripts/gpu_2gpu.sh tests    tests/test_fsdp2_gpu.py + tests/test_zero3_gpu.py, all
#                                     tests at once (pytest-xdist), through `axolotl train`
#   bash scripts/gpu_2gpu.sh bench    benchmarks/bench_multi_gpu.py (memory and tokens/s table)
#   bash scripts/gpu_2gpu.sh checks   benchmarks/fsdp2_check.py / zero3_check.py / bench_fsdp2_rollout.py
#                                     under torchrun
# Several words run in turn; outputs (logs, tables, JSON) in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_2gpu_out}
mkdir -p "$OUT" /tmp/clean
tar -xf .clean/head.tar -C /tmp/clean && cp -r .assets .axsite /tmp/clean/ && cd /tmp/clean
bash scripts/device_bin.sh > /dev/null 2>&1
export PYTHONPATH=/tmp/axsite:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
source scripts/env.sh
nvidia-smi -L
for what in "$@"; do
  case $what in
    tests)
      python3 tests/real_shapes.py /tmp/real_shapes > "$OUT/real_shapes.txt" 2>&1 || tail -20 "$OUT/real_shapes.txt"
      GOLD_TEST_REPORT="$OUT/figures.txt" GOLD_REAL_SHAPE_MODELS=/tmp/real_shapes timeout "${GOLD_2GPU_TESTS_S:-500}" python3 -m pytest -v -n 8 \
        -k "${GOLD_2GPU_TESTS_K:-.}" -p no:cacheprovider -rs --basetemp=/tmp/t2 tests/test_fsdp2_gpu.py tests/test_zero3_gpu.py > "$OUT/tests.log" 2>&1
      echo "pytest exit $?"
      cat "$OUT/figures.txt" 2>/dev/null
      grep -E "PASSED|FAILED|ERROR|passed|failed|Error:" "$OUT/tests.log" | tail -30
      ;;
    bench)
      timeout "${GOLD_2GPU_BENCH_S:-500}" python3 benchmarks/bench_multi_gpu.py --completion "${GOLD_2GPU_COMPLETION:-256}" \
        ${GOLD_2GPU_ROWS:+--rows "$GOLD_2GPU_ROWS"} \
        --warmup 1 --steps 2 --workdir /tmp/mgpu --json "$OUT/bench_multi_gpu.json" > "$OUT/bench_multi_gpu.txt" 2>&1
      grep -E "^\||^student|Error|error" "$OUT/bench_multi_gpu.txt" | tail -30
      ;;
    checks)
      timeout 150 torchrun --nproc_per_node 2 benchmarks/fsdp2_check.py --device cuda > "$OUT/fsdp2_check.txt" 2>&1
      grep "^|" "$OUT/fsdp2_check.txt" || tail -15 "$OUT/fsdp2_check.txt"
      timeout 300 torchrun --nproc_per_node 2 benchmarks/bench_fsdp2_rollout.py --compile \
        --json "$OUT/bench_fsdp2_rollout.json" > "$OUT/bench_fsdp2_rollout.txt" 2>&1
      grep -E "^\||^device" "$OUT/bench_fsdp2_rollout.txt" || tail -15 "$OUT/bench_fsdp2_rollout.txt"
      for flags in "" --tied "--engine static --skip-memory"; do  # the last: CUDA graphs on the gathered student
        name=zero3_check$(echo $flags | tr -d ' -')
        timeout 150 torchrun --nproc_per_node 2 benchmarks/zero3_check.py $flags > "$OUT/$name.txt" 2>&1
        grep "^|" "$OUT/$name.txt" || tail -15 "$OUT/$name.txt"
      done
      ;;
  esac
done
# each failed run's log (run_train writes log.txt in its folder), last lines only
for f in $(grep -l "Traceback" /tmp/t2/*/*/log.txt /tmp/t2/*/*/*/log.txt /tmp/mgpu/*/log.txt 2>/dev/null | head -6); do
  echo "== $f"; grep -v "^\s*$" "$f" | tail -25
done
