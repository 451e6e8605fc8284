#!/bin/bash
# On the GPU machine, from a clean export of HEAD (carry .clean/head.tar made by
# `git archive HEAD -o .clean/head.tar`, .assets and .axsite): the benchmarks named in
# GOLD_BENCH (comma-separated; default all) one after another, outputs in $OUT.
#   nucleus  benchmarks/bench_nucleus.py (the sort-free top-p kernels per setting; GOLD_NUCLEUS_ARGS, e.g.
#            "--profile --search-blocks 64,128,256")
#   student  benchmarks/profile_student_step.py --variants --torch-profile
#   ragged   benchmarks/bench_vs_reference.py --ragged --skip-reference --variants ours-fast
#   cli      benchmarks/bench_cli.py --compile --warmup 1 --steps 2 (plain loop and `axolotl train`)
#   cli-sync bench_cli.py --compile --skip-plain --student-compile reduce-overhead with HF's
#            logging_nan_inf_filter on (--nan-inf-filter), then off (the trainer's default): what its host
#            read of each micro-step's loss costs the graphed step (GOLD_CLI_STEPS measured steps, 2; GOLD_CLI_S s each, 300)
#   cli-fused  bench_cli.py --compile --skip-plain --student-compile reduce-overhead with --fuse-projections off,
#            then on (gold_rollout_fuse_projections; on is the default with --compile; GOLD_CLI_S s each, 270;
#            GOLD_CLI_FUSED: which of them, "off on")
#   cli-reference  bench_cli.py --compile --with-reference --skip-plain --student-compile reduce-overhead
#            --warmup 1 --steps 1: `axolotl train` (graphed student, fused projections) and TRL's GOLDTrainer
#            in one run, issue #16's step ratio (GOLD_CLI_S, 480; the reference takes ~110 s a step)
#   cli-lora  bench_cli.py --compile --skip-plain --student-compile reduce-overhead --lora-r 16: `axolotl train`
#            with a LoRA student (all linear layers; Axolotl's LoRA kernels as it sets them), fused projections
#            off, then on (GOLD_CLI_FUSED; GOLD_CLI_S s each, 300): the LoRA decode beside the full fine-tune's
#   fused-lora  benchmarks/bench_fused_lora.py --compile (a LoRA student's decode, 0.5B shape, rank 16 on every
#            linear layer: the static engine with its projections grouped against peft's own layers;
#            GOLD_FUSED_LORA_ARGS adds arguments)
#   cli-profile  bench_cli.py --compile --skip-plain --student-compile reduce-overhead (GOLD_CLI_MODE) --profile-step:
#            one more `axolotl train` step under torch.profiler, its idle gaps and host waits (step_profile.py)
#   cli-memory  bench_cli.py --compile --memory-at-peak --skip-plain at loss chunk 2048, 1024 (the
#            default) and 512 (GOLD_CLI_CHUNKS): what `axolotl train`'s step peak holds, by site
#   kernels  the CUDA unit tests (decode attention kernel, static engine, refills, image prompts,
#            sampling, the fused JSD's Triton path, the head's compute dtype; the static engine's
#            graphs under FSDP2 at world size 1); GOLD_KERNEL_TESTS overrides the files,
#            GOLD_KERNEL_TESTS_K the -k expression
#   decode   benchmarks/profile_decode.py --only-compile (0.5B shape: Triton / tensor attention; GOLD_DECODE_ARGS
#            adds arguments, e.g. "--attention kernel --compile-modes default,max-autotune-no-cudagraphs";
#            GOLD_DECODE_S seconds, 240)
#   decode-base  the same from .clean/base.tar (`git archive <commit> -o .clean/base.tar`): an earlier
#            tree's decode, before `decode`'s after, on one machine
#   decode-axolotl  profile_decode.py --only-compile --attention kernel --axolotl-dtypes (the student's dtypes
#            in `axolotl train`: float32 embeddings / head / norms under bf16 autocast; beside `decode`)
#   decode360  benchmarks/profile_decode.py --only-compile at SmolLM2-360M's shape (GOLD_DECODE360_ATTENTION,
#            both; GOLD_DECODE360_ARGS adds arguments, e.g. "--fuse-projections on")
#   student-ragged  profile_student_step.py --ragged, default allocator then expandable segments
#            (why the ragged windows' student and teacher sides ran ~2x slower than forced; the
#            first run also times the rows as drawn, before group_by_length, and the compile rows)
#   fsdp2    benchmarks/bench_fsdp2_rollout.py --compile (FSDP2 at world size 1: HF generate and the
#            static engine with FSDP's forward hooks on vs set aside)
#   zero3-static  benchmarks/zero3_check.py --engine static at world size 1 (CUDA graphs of the
#            static engine on DeepSpeed's gathered student, rollouts against one GPU without DeepSpeed)
#   cli-graphs  bench_cli.py --compile --skip-plain, the student eager and with `torch_compile_mode:
#            reduce-overhead` (GOLD_CLI_MODES; GOLD_CLI_S seconds each, 280)
#   student-graphs  profile_student_step.py --variants --rows reduce-overhead --torch-profile (forced
#            window: the student eager vs `torch_compile_mode: reduce-overhead`, and the device's busy share;
#            GOLD_TRACE_GENERATIONS=1 prints each stage between the forward and its backward that
#            entered torch.compile, and a failed row's whole traceback follows)
#   student-cudnn  profile_student_step.py --variants --rows "cuDNN,reduce-overhead" --torch-profile
#            --profile-compiled reduce-overhead (forced window: what turning cuDNN's attention off costs
#            the eager step, the graphed student's side, and the graphed step's kernels)
#   student-rolled  profile_student_step.py --variants --rows "cuDNN,padding mask,reduce-overhead" --torch-profile
#            --profile-compiled reduce-overhead (forced window: the rows rolled left, no padding mask, against
#            the masked layout, eager and in CUDA graphs; cuDNN allowed; the graphed step's kernels)
#   student-stages  profile_student_step.py --variants --rows "reduce-overhead (CUDA graphs),max-autotune"
#            --torch-profile --profile-compiled reduce-overhead (forced window: the graphed student with cuBLAS
#            and with GEMMs autotuned; the graphed step's kernels, and each student-side stage's own;
#            GOLD_STUDENT_ROWS overrides the rows)
#   layout   benchmarks/bench_attention_layout.py (one attention layer, padding mask vs rows rolled left),
#            then profile_student_step.py --torch-profile with the rows rolled and with --masked (eager
#            stages and kernels of each layout, separate processes)
#   graphs-probe  benchmarks/probe_graphed_cli.py (the GPU suite's CUDA-graphs case and variants through
#            `axolotl train`, non-finite gradients by micro-step; GOLD_PROBE_VARIANTS): runs beside the
#            other sections, which start at once
#   refill   benchmarks/bench_refill.py --compile --variants refill,chunked (64 ragged prompts through
#            16 slots: refilled vs one batch after another; 3 row buckets to compile)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT" /tmp/clean
SRC=$PWD
tar -xf .clean/head.tar -C /tmp/clean && cp -r .assets .axsite /tmp/clean/ && cd /tmp/clean
bash scripts/device_bin.sh > /dev/null 2>&1
export PYTHONPATH=/tmp/axsite:$PWD
if ! python3 -c "import pytest" 2>/dev/null; then  # the carried pure-Python wheels (gpu_suite.sh --prepare)
  for w in .assets/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/gpu_pytest; done
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_pytest"
fi
want=",${GOLD_BENCH:-nucleus,student,ragged,decode360},"
probe=
if [[ $want == *,graphs-probe,* ]]; then  # mostly compile on the CPU: beside the rest
  timeout $(( ${GOLD_PROBE_S:-300} + 40 )) python3 benchmarks/probe_graphed_cli.py --out "$OUT" > "$OUT/probe_graphed.txt" 2>&1 &
  probe=$!
fi
if [[ $want == *,kernels,* ]]; then
  timeout "${GOLD_KERNELS_S:-360}" python3 -m pytest -q -rs -p no:cacheprovider ${GOLD_KERNEL_TESTS:-tests/test_decode_kernel.py \
    tests/test_static_engine.py tests/test_slot_refill.py tests/test_static_vision.py tests/test_decode_attention.py \
    tests/test_nucleus_sampling.py tests/losses/test_chunked_jsd.py tests/test_head_compute_dtype.py tests/test_fused_projections.py \
    tests/test_fsdp2.py::test_static_engine_graphs_under_fsdp2_on_cuda} -s \
    -k "${GOLD_KERNEL_TESTS_K:-not interpreter}" > "$OUT/cuda_tests.txt" 2>&1
  tail -8 "$OUT/cuda_tests.txt"
fi
if [[ $want == *,cli,* ]]; then
  timeout "${GOLD_CLI_S:-420}" python3 benchmarks/bench_cli.py --compile --warmup 1 --steps 2 \
    --json "$OUT/bench_cli.json" > "$OUT/bench_cli.txt" 2>&1
  grep -E "^\||^device|failed" "$OUT/bench_cli.txt" || tail -30 "$OUT/bench_cli.txt"
fi
if [[ $want == *,cli-graphs,* ]]; then  # the same `axolotl train` run, student eager vs in CUDA graphs
  for mode in ${GOLD_CLI_MODES:-eager reduce-overhead}; do
    timeout "${GOLD_CLI_S:-280}" python3 benchmarks/bench_cli.py --compile --warmup 1 --steps 2 --skip-plain \
      $([ $mode = eager ] || echo --student-compile $mode) --json "$OUT/bench_cli_$mode.json" > "$OUT/bench_cli_$mode.txt" 2>&1
    echo "student: $mode"; grep -E "^\||^device|failed" "$OUT/bench_cli_$mode.txt" || tail -30 "$OUT/bench_cli_$mode.txt"
  done
fi
if [[ $want == *,cli-sync,* ]]; then  # `axolotl train`, graphed student: HF's NaN filter (a wait a micro-step) on, then off
  for filter in on off; do
    timeout "${GOLD_CLI_S:-300}" python3 benchmarks/bench_cli.py --compile --warmup 1 --steps "${GOLD_CLI_STEPS:-2}" --skip-plain \
      --student-compile reduce-overhead $([ $filter = on ] && echo --nan-inf-filter) \
      --json "$OUT/bench_cli_nanfilter_$filter.json" > "$OUT/bench_cli_nanfilter_$filter.txt" 2>&1
    echo "HF NaN filter: $filter"; grep -E "^\||failed" "$OUT/bench_cli_nanfilter_$filter.txt" | head -4 || tail -30 "$OUT/bench_cli_nanfilter_$filter.txt"
    python3 -c "import json,sys; print({k: v for k, v in json.load(open(sys.argv[1]))['axolotl train'].items() if k.endswith('_s')})" "$OUT/bench_cli_nanfilter_$filter.json"
  done
fi
if [[ $want == *,cli-fused,* ]]; then  # `axolotl train`, graphed student: the decode's projections unfused, then fused
  for fused in ${GOLD_CLI_FUSED:-off on}; do
    timeout "${GOLD_CLI_S:-270}" python3 benchmarks/bench_cli.py --compile --warmup 1 --steps "${GOLD_CLI_STEPS:-2}" --skip-plain \
      --student-compile reduce-overhead --fuse-projections $fused \
      --json "$OUT/bench_cli_fused_$fused.json" > "$OUT/bench_cli_fused_$fused.txt" 2>&1
    echo "fused projections: $fused"; grep -E "^\||failed" "$OUT/bench_cli_fused_$fused.txt" | head -4 || tail -30 "$OUT/bench_cli_fused_$fused.txt"
    python3 -c "import json,sys; print({k: v for k, v in json.load(open(sys.argv[1]))['axolotl train'].items() if k.endswith('_s')})" "$OUT/bench_cli_fused_$fused.json"
  done
fi
if [[ $want == *,cli-reference,* ]]; then  # ours and the reference in one run: the ratio issue #16 names
  timeout "${GOLD_CLI_S:-480}" python3 benchmarks/bench_cli.py --compile --with-reference --skip-plain \
    --student-compile reduce-overhead --warmup 1 --steps 1 \
    --json "$OUT/bench_cli_reference.json" > "$OUT/bench_cli_reference.txt" 2>&1
  grep -E "^\||^device|failed|x the" "$OUT/bench_cli_reference.txt" || tail -30 "$OUT/bench_cli_reference.txt"
fi
if [[ $want == *,cli-lora,* ]]; then  # `axolotl train`, LoRA student, graphed: its decode unfused, then fused
  for fused in ${GOLD_CLI_FUSED:-off on}; do
    timeout "${GOLD_CLI_S:-300}" python3 benchmarks/bench_cli.py --compile --warmup 1 --steps "${GOLD_CLI_STEPS:-2}" --skip-plain \
      --student-compile reduce-overhead --lora-r 16 --fuse-projections $fused \
      --json "$OUT/bench_cli_lora_$fused.json" > "$OUT/bench_cli_lora_$fused.txt" 2>&1
    echo "LoRA, fused projections: $fused"; grep -E "^\||failed" "$OUT/bench_cli_lora_$fused.txt" | head -4 || tail -30 "$OUT/bench_cli_lora_$fused.txt"
  done
fi
if [[ $want == *,fused-lora,* ]]; then
  timeout "${GOLD_FUSED_LORA_S:-300}" python3 benchmarks/bench_fused_lora.py --compile ${GOLD_FUSED_LORA_ARGS:-} \
    --json "$OUT/bench_fused_lora.json" > "$OUT/bench_fused_lora.txt" 2>&1
  grep -E "^\||^device" "$OUT/bench_fused_lora.txt" || tail -30 "$OUT/bench_fused_lora.txt"
fi
if [[ $want == *,cli-profile,* ]]; then  # `axolotl train`, graphed student: one step more, profiled
  timeout "${GOLD_CLI_S:-300}" python3 benchmarks/bench_cli.py --compile --warmup 1 --steps 1 --skip-plain \
    --student-compile "${GOLD_CLI_MODE:-reduce-overhead}" --profile-step \
    --json "$OUT/bench_cli_profile.json" > "$OUT/bench_cli_profile.txt" 2>&1
  grep -E "^\||^kernels|^optimizer step|^the |^host" "$OUT/bench_cli_profile.txt" | head -60 || tail -30 "$OUT/bench_cli_profile.txt"
fi
if [[ $want == *,cli-memory,* ]]; then
  for chunk in ${GOLD_CLI_CHUNKS:-2048 1024 512}; do
    timeout "${GOLD_CLI_S:-420}" python3 benchmarks/bench_cli.py --compile --warmup 2 --steps 1 --memory-at-peak --skip-plain \
      --chunk-size $chunk --json "$OUT/bench_cli_memory_$chunk.json" > "$OUT/bench_cli_memory_$chunk.txt" 2>&1
    grep -E "^\||^device|^step peak|failed" "$OUT/bench_cli_memory_$chunk.txt" || tail -30 "$OUT/bench_cli_memory_$chunk.txt"
  done
fi
if [[ $want == *,decode-base,* ]]; then  # `decode` from an earlier commit's tree (.clean/base.tar), its before
  mkdir -p /tmp/base && tar -xf "$SRC/.clean/base.tar" -C /tmp/base
  (cd /tmp/base && PYTHONPATH=/tmp/axsite:/tmp/base timeout "${GOLD_DECODE_S:-240}" python3 benchmarks/profile_decode.py \
    --only-compile ${GOLD_DECODE_ARGS:-} --json "$OUT/profile_decode_base.json" > "$OUT/profile_decode_base.txt" 2>&1)
  grep "^|" "$OUT/profile_decode_base.txt" || tail -20 "$OUT/profile_decode_base.txt"
fi
if [[ $want == *,decode,* ]]; then
  timeout "${GOLD_DECODE_S:-240}" python3 benchmarks/profile_decode.py --only-compile ${GOLD_DECODE_ARGS:-} \
    --json "$OUT/profile_decode.json" > "$OUT/profile_decode.txt" 2>&1
  grep "^|" "$OUT/profile_decode.txt" || tail -20 "$OUT/profile_decode.txt"
fi
if [[ $want == *,decode-axolotl,* ]]; then  # the same with Axolotl's float32 embeddings / head / norms
  timeout 240 python3 benchmarks/profile_decode.py --only-compile --attention kernel --axolotl-dtypes \
    --json "$OUT/profile_decode_axolotl.json" > "$OUT/profile_decode_axolotl.txt" 2>&1
  grep "^|" "$OUT/profile_decode_axolotl.txt" || tail -20 "$OUT/profile_decode_axolotl.txt"
fi
if [[ $want == *,nucleus,* ]]; then
  python3 benchmarks/bench_nucleus.py ${GOLD_NUCLEUS_ARGS:-} --json "$OUT/bench_nucleus.json" 2>&1 | grep "^|\|^kernels"
fi
if [[ $want == *,student,* ]]; then
  timeout 200 python3 benchmarks/profile_student_step.py --variants --torch-profile \
    --json "$OUT/profile_student_step.json" > "$OUT/profile_student_step.txt" 2>&1
  grep "^|" "$OUT/profile_student_step.txt" | head -60 || tail -20 "$OUT/profile_student_step.txt"
fi
if [[ $want == *,ragged,* ]]; then
  timeout 200 python3 benchmarks/bench_vs_reference.py --ragged --skip-reference --variants ours-fast \
    --steps 3 --json-dir "$OUT/ragged" > "$OUT/ragged.txt" 2>&1
  grep "^|" "$OUT/ragged.txt" || tail -20 "$OUT/ragged.txt"
fi
if [[ $want == *,decode360,* ]]; then
  timeout 240 python3 benchmarks/profile_decode.py --only-compile --attention "${GOLD_DECODE360_ATTENTION:-both}" \
    --layers 32 --hidden 960 --heads 15 \
    --kv-heads 5 --intermediate 2560 --vocab 49152 ${GOLD_DECODE360_ARGS:-} --json "$OUT/profile_decode_360m.json" \
    > "$OUT/profile_decode_360m.txt" 2>&1
  grep "^|" "$OUT/profile_decode_360m.txt" || tail -20 "$OUT/profile_decode_360m.txt"
fi
if [[ $want == *,refill,* ]]; then
  timeout "${GOLD_REFILL_S:-420}" python3 benchmarks/bench_refill.py --compile --variants refill,chunked --json "$OUT/bench_refill.json" > "$OUT/bench_refill.txt" 2>&1
  grep -E "^\||^device" "$OUT/bench_refill.txt" || tail -20 "$OUT/bench_refill.txt"
fi
if [[ $want == *,fsdp2,* ]]; then  # FSDP2 at world size 1: its hooks' cost per decoding step, and graphs
  timeout "${GOLD_FSDP2_S:-300}" python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/bench_fsdp2_rollout.py \
    --compile --json "$OUT/bench_fsdp2_rollout.json" > "$OUT/bench_fsdp2_rollout.txt" 2>&1
  grep -E "^\||^device" "$OUT/bench_fsdp2_rollout.txt" || tail -20 "$OUT/bench_fsdp2_rollout.txt"
fi
if [[ $want == *,zero3-static,* ]]; then  # ZeRO-3 at world size 1: the static engine's graphs on the gathered student
  timeout 200 python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/zero3_check.py --engine static \
    --skip-memory > "$OUT/zero3_check_static.txt" 2>&1
  grep "^|" "$OUT/zero3_check_static.txt" || tail -20 "$OUT/zero3_check_static.txt"
fi
if [[ $want == *,student-graphs,* ]]; then  # the forced window: eager vs inductor's CUDA graphs, device busy share
  GOLD_TRACE_GENERATIONS=1 timeout 560 python3 benchmarks/profile_student_step.py --variants --rows reduce-overhead \
    --torch-profile --json "$OUT/profile_student_graphs.json" > "$OUT/profile_student_graphs.txt" 2>&1
  grep -E "^\||^top|^\[variant|^\[generations" "$OUT/profile_student_graphs.txt" | head -60 \
    || tail -20 "$OUT/profile_student_graphs.txt"
fi
if [[ $want == *,student-cudnn,* ]]; then
  timeout "${GOLD_STUDENT_S:-400}" python3 benchmarks/profile_student_step.py --variants --rows "cuDNN,reduce-overhead" \
    --torch-profile --profile-compiled reduce-overhead --json "$OUT/profile_student_cudnn.json" \
    > "$OUT/profile_student_cudnn.txt" 2>&1
  grep -E "^\||^top|^\[variant" "$OUT/profile_student_cudnn.txt" | head -70 || tail -20 "$OUT/profile_student_cudnn.txt"
fi
if [[ $want == *,student-rolled,* ]]; then
  timeout "${GOLD_STUDENT_S:-420}" python3 benchmarks/profile_student_step.py --variants \
    --rows "cuDNN,padding mask,reduce-overhead" --torch-profile --profile-compiled reduce-overhead \
    --json "$OUT/profile_student_rolled.json" > "$OUT/profile_student_rolled.txt" 2>&1
  grep -E "^\||^top|^\[variant" "$OUT/profile_student_rolled.txt" | head -70 || tail -20 "$OUT/profile_student_rolled.txt"
fi
if [[ $want == *,student-stages,* ]]; then
  timeout "${GOLD_STUDENT_S:-540}" python3 benchmarks/profile_student_step.py --variants \
    --rows "${GOLD_STUDENT_ROWS:-reduce-overhead (CUDA graphs),max-autotune}" --torch-profile \
    --profile-compiled reduce-overhead --json "$OUT/profile_student_stages.json" > "$OUT/profile_student_stages.txt" 2>&1
  grep -E "^\||^top|^kernels|^\[variant" "$OUT/profile_student_stages.txt" | head -150 || tail -20 "$OUT/profile_student_stages.txt"
fi
if [[ $want == *,layout,* ]]; then
  timeout 120 python3 benchmarks/bench_attention_layout.py --json "$OUT/bench_attention_layout.json" \
    > "$OUT/bench_attention_layout.txt" 2>&1
  grep -E "^\||^device" "$OUT/bench_attention_layout.txt" || tail -20 "$OUT/bench_attention_layout.txt"
  for layout in rolled masked; do
    timeout "${GOLD_LAYOUT_S:-200}" python3 benchmarks/profile_student_step.py --torch-profile \
      $([ $layout = masked ] && echo --masked) --json "$OUT/profile_student_$layout.json" \
      > "$OUT/profile_student_$layout.txt" 2>&1
    echo "layout: $layout"; grep -E "^\||^top|^device" "$OUT/profile_student_$layout.txt" | head -48
  done
fi
if [[ $want == *,student-ragged,* ]]; then
  for alloc in default expandable_segments:True; do  # the first also times the rows as drawn and compiled
    PYTORCH_CUDA_ALLOC_CONF=$([ $alloc = default ] || echo $alloc) timeout 400 python3 benchmarks/profile_student_step.py \
      --ragged --torch-profile $([ $alloc = default ] && echo --variants --only-compile) \
      --json "$OUT/profile_student_ragged_${alloc%%:*}.json" \
      > "$OUT/profile_student_ragged_${alloc%%:*}.txt" 2>&1
    echo "allocator: $alloc"; grep -E "^\|" "$OUT/profile_student_ragged_${alloc%%:*}.txt" | head -22
  done
fi
if [ -n "$probe" ]; then
  wait $probe
  grep -E "^##|^  step" "$OUT/probe_graphed.txt" || tail -30 "$OUT/probe_graphed.txt"
fi
