"""Where the student side of a GOLD step goes: each stage device-synced, against its floor.

bench_cli's plain loop (bench_vs_reference.Ours: the same models, engine, objective and
optimizer, 0.5B Qwen2-shaped student, 1.5B teacher, vocab 151,936, 16 rollouts of
256 + 768 tokens, micro batch 4 x accumulation 4) runs one window of rollouts once, then
per optimizer step times, with a device sync around each:

  prefill          the engine's prompt forward for the window's 16 rows into its static cache
  student forward  to the final hidden states of the completion region (head bypassed)
  teacher forward  the same, no grad
  loss             our fused JSD from hidden states (losses/chunked.py: it takes the
                   gradient to the student's hidden states and lm_head inside its forward)
  loss backward    the loss's own backward (scales and casts the gradients it holds)
  model backward   the rest of autograd: through the 24 layers into the weights
  optimizer step   AdamW (fused on CUDA, as bench_cli), and zero_grad (set_to_none)

(the loss runs on a detached copy of the hidden states so its backward and the model's
can be timed apart), the median over --steps steps after --warmup. Beside each stage: its
floor on an H200 (989 TFLOP/s bf16 dense, 4.8 TB/s; the larger of the FLOP and byte
floors; matmul FLOPs from the weights' shapes and the batch shapes, causal attention
counted half) and the ratio. "student side, as the plain loop runs it" is bench_cli's
own micro-step loop (Ours.train) less the teacher, the figure the README quotes (0.38 s).

--variants adds one row each: the window's rows as the slices drew them (the micro-batches
before ``group_by_length``: more padded positions on ragged windows), the scoring widths rounded
up to multiples of 64 (``gold_scoring_width_multiple: 64``: the cost of the padding), gradient checkpointing toggled, loss chunk sizes, AdamW
foreach instead of fused (or fused on CPU), Liger's fused linear JSD (skipped when liger_kernel
is not importable), cuDNN's attention kernels allowed in the step (the trainer turns them off:
``trainer.attention_backends``), the padding mask (the rows as laid out, not rolled left:
``scoring.causal_rows``), the student through ``torch.compile`` alone and with
loss chunk 4096, through ``torch.compile(mode="reduce-overhead")`` (Axolotl's
``torch_compile_mode: reduce-overhead``: CUDA graphs of the forward and backward, one per
micro-batch shape; then again with the widths rounded to 64, and with the padding mask; the
student gets its own ``.grad`` buffers first, ``trainer.grad_buffers``: a graph's output must
not become ``.grad``), through ``mode="max-autotune"`` (``torch_compile_mode: max-autotune``:
each matmul's Triton templates timed against cuBLAS, CUDA graphs too; CUDA only), the student
with Axolotl's full fine-tune dtypes (embeddings, lm_head, norms float32, bf16 autocast: what
`axolotl train` runs; eager, graphed, and graphed with the embedding's output cast to bf16), and last
the student with Liger's RMSNorm / SwiGLU / RoPE kernels (what
Axolotl's Liger plugin applies; CUDA only; ``--only-compile`` keeps it beside the compile rows). The compile rows mirror Axolotl's ``torch_compile: true``: HF's Trainer
hands ``torch_compile_backend`` (inductor, no mode) to Accelerate, whose ``prepare`` wraps
the whole model in ``torch.compile(model, backend="inductor")``; the trainer's forward and
backward run through that wrapper while the engines keep the plain model (so prefill stays
eager here too). Each compile row is timed after its warm-up; the first step's student side
less a measured step's is reported as its compile time (lower when inductor's on-disk cache
already holds the graphs), beside the number of graphs dynamo compiled for it.
TF32 is not a knob here: the matmuls are bf16.
--torch-profile prints the top 25 CUDA kernels of one step by total time (on CPU: ops), then each
student-side stage's own top kernels and how busy the device was during it;
--profile-compiled [MODE] profiles the compiled student instead (with --torch-profile; MODE
reduce-overhead: the CUDA-graphed student, its graphs' kernels listed as eager ones are).
--masked runs everything on the masked layout (``scoring.causal_rows`` undone).

GPU (device machine; no axolotl needed):
  python3 benchmarks/profile_student_step.py --variants --torch-profile --json OUT.json
  python3 benchmarks/profile_student_step.py --variants --only-compile --torch-profile --profile-compiled \
      --json OUT.json    # the baseline and the compile rows only, kernels of the compiled step
  python3 benchmarks/profile_student_step.py --variants --rows reduce-overhead --torch-profile
                         # the baseline and the CUDA-graph row only
CPU smoke test:
  source scripts/env.sh && .venv/bin/python benchmarks/profile_student_step.py --tiny --device cpu
Shape flags are bench_vs_reference's (--prompt, --completion, --micro-batch, --grad-accum,
--vocab, --chunk-size, --gradient-checkpointing, --seed, --warmup (here 2), --steps (here 5)).
The stages and floors are student_stages.py's, the knobs student_variants.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from stage_clock import Clock  # noqa: E402
from student_stages import STUDENT_SIDE, floors, kernel_table, measure, plain_model, split_step, stage_table  # noqa: E402
from student_variants import (  # noqa: E402
    AXOLOTL_ROWS, COMPILE_ROWS, DRAWN_ROW, LIGER_ROW, ROUNDED_ROW, dynamo_graphs, variant_table, variants)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", action="store_true", help="also time each knob (one row each)")
    p.add_argument("--torch-profile", action="store_true", help="top 25 CUDA kernels of one step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only-compile", action="store_true",
                   help="with --variants: only the torch.compile rows, the Liger row and the rows-as-drawn row")
    p.add_argument("--rows", default=None,
                   help="with --variants: only the rows whose name contains one of these comma-separated words")
    p.add_argument("--profile-compiled", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune"),
                   help="with --torch-profile: profile the step with the student through torch.compile "
                        "in this mode (default: no mode; reduce-overhead: its CUDA graphs, whose kernels "
                        "the profiler lists as it does eager ones)")
    p.add_argument("--masked", action="store_true",
                   help="the whole run on the masked layout (rows not rolled left, scoring.causal_rows "
                        "undone): its stages and kernels beside a run without the flag")
    own, rest = p.parse_known_args(argv)
    import bench_vs_reference as bvr

    return own, bvr.parse_args(["--warmup", "2", "--steps", "5", *rest]), bvr


def main(argv=None) -> None:
    own, args, bvr = parse_args(sys.argv[1:] if argv is None else argv)
    if own.masked:
        from axolotl_gold.scoring import causal_rows

        causal_rows.ROLL_ROWS = False
    ours = bvr.Ours(args, "ours-fast")
    window = args.micro_batch * args.grad_accum
    prompts = bvr.build_prompts(args, window)
    prepared = ours.prepare(prompts, step=0)  # one window of forced-length rollouts, reused
    lengths = prepared.window.completion_lengths()
    print(f"rollouts: {len(lengths)} x {min(lengths)}..{max(lengths)} tokens, {prepared.local_tokens} scored, "
          f"generation {prepared.generation_seconds:.2f} s", flush=True)
    ms = measure(ours, prepared, prompts, args, plain=True)
    floor = floors(ours, prepared, prompts)
    header = (f"device {args.device}; student {'tiny' if args.tiny else '~0.5B'}, teacher {'tiny' if args.tiny else '~1.5B'}, "
              f"vocab {args.vocab}; {window} rollouts of {args.prompt} + {args.completion} tokens, micro batch "
              f"{args.micro_batch} x {args.grad_accum}; loss chunk {args.chunk_size}; gradient checkpointing "
              f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.steps} step(s) after {args.warmup}; "
              f"rows {'as laid out (padding mask)' if own.masked else 'rolled left where exact (no mask)'}")
    print("\n" + header + "\n\n" + stage_table(ms, floor), flush=True)
    result = {"stages_ms": ms, "floors_ms": {k: 1e3 * v[0] for k, v in floor.items()},
              "floor_bound": {k: v[1] for k, v in floor.items()}, "args": vars(args)}
    if own.variants:
        rows = []
        for name, knob in variants(ours, args, prepared):
            kept = name in (*COMPILE_ROWS, *AXOLOTL_ROWS, LIGER_ROW) or name.startswith((DRAWN_ROW, ROUNDED_ROW))
            if own.only_compile and not kept:
                continue  # a knob not entered changes nothing
            if own.rows and not any(word in name for word in own.rows.split(",")):
                continue
            if isinstance(knob, str):
                rows.append((name, knob))
                continue
            graphs = dynamo_graphs()
            note = ""
            try:
                with knob:
                    rows.append((name, measure(ours, prepared, prompts, args)))
                if name in COMPILE_ROWS or name in AXOLOTL_ROWS[1:]:
                    row = rows[-1][1]
                    row["compile s"] = (row["first step"] - sum(row[s] for s in STUDENT_SIDE)) / 1e3
                    row["dynamo graphs"] = dynamo_graphs() - graphs
                    note = (f" (first step {row['first step'] / 1e3:.1f} s: about {row['compile s']:.1f} s of "
                            f"compiling, {row['dynamo graphs']} new graph(s))" if row["dynamo graphs"]
                            else " (the graphs above reused: nothing compiled)")
            except Exception as error:  # noqa: BLE001 - one knob failing leaves the others
                rows.append((name, f"failed: {type(error).__name__}: {error}"[:200]))
                traceback.print_exc()  # the table keeps 200 characters; where it failed is here
            print(f"[variant] {name}: done{note}", flush=True)
        print("\nknobs (ms per optimizer step)\n\n" + variant_table(rows, ms), flush=True)
        result["variants"] = dict(rows)
    if own.torch_profile:
        title = ""
        if own.profile_compiled:  # the compiled student, warmed up outside the profile
            import torch

            mode = None if own.profile_compiled == "default" else own.profile_compiled
            ours.student = torch.compile(plain_model(ours.student), backend="inductor", mode=mode)
            ours.graphed = mode is not None  # own .grad buffers under CUDA graphs (trainer.grad_buffers)
            for _ in range(2):
                split_step(ours, prepared, Clock(ours.device))
            title = f" (student through torch.compile{f', mode {mode}' if mode else ''})"
        print("\n" + kernel_table(ours, prepared, prompts).replace("by total time", "by total time" + title, 1),
              flush=True)
    if own.json:
        Path(own.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
