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
foreach instead of fused (or fused on CPU), Liger's fused linear JSD (skipped when
liger_kernel is not importable), the student through ``torch.compile`` alone and with
loss chunk 4096, through ``torch.compile(mode="reduce-overhead")`` (Axolotl's
``torch_compile_mode: reduce-overhead``: CUDA graphs of the forward and backward, one per
micro-batch shape; then again with the widths rounded to 64; the student gets its own
``.grad`` buffers first, ``trainer.grad_buffers``: a graph's output must not become ``.grad``;
the plugin still refuses the mode through ``axolotl train``, see the README), and last
the student with Liger's RMSNorm / SwiGLU / RoPE kernels (what
Axolotl's Liger plugin applies; CUDA only; ``--only-compile`` keeps it beside the compile rows). The compile rows mirror Axolotl's ``torch_compile: true``: HF's Trainer
hands ``torch_compile_backend`` (inductor, no mode) to Accelerate, whose ``prepare`` wraps
the whole model in ``torch.compile(model, backend="inductor")``; the trainer's forward and
backward run through that wrapper while the engines keep the plain model (so prefill stays
eager here too). Each compile row is timed after its warm-up; the first step's student side
less a measured step's is reported as its compile time (lower when inductor's on-disk cache
already holds the graphs), beside the number of graphs dynamo compiled for it.
TF32 is not a knob here: the matmuls are bf16.
--torch-profile prints the top 25 CUDA kernels of one step by total time (on CPU: ops);
--profile-compiled profiles the compiled student instead (with --torch-profile).

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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

from stage_clock import Clock, generations

HERE = Path(__file__).resolve().parent
H200_FLOPS, H200_BYTES = 989e12, 4.8e12
STAGES = ("prefill", "student forward", "teacher forward", "loss", "loss backward", "model backward",
          "optimizer step", "zero_grad")
STUDENT_SIDE = STAGES[1:2] + STAGES[3:]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", action="store_true", help="also time each knob (one row each)")
    p.add_argument("--torch-profile", action="store_true", help="top 25 CUDA kernels of one step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only-compile", action="store_true",
                   help="with --variants: only the torch.compile rows, the Liger row and the rows-as-drawn row")
    p.add_argument("--rows", default=None,
                   help="with --variants: only the rows whose name contains one of these comma-separated words")
    p.add_argument("--profile-compiled", action="store_true",
                   help="with --torch-profile: profile the step with the student through torch.compile")
    own, rest = p.parse_known_args(argv)
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import bench_vs_reference as bvr

    return own, bvr.parse_args(["--warmup", "2", "--steps", "5", *rest]), bvr


def prefill(ours, prompts, clock) -> None:
    """The static engine's prefill (``DecodeStep.prefill``: HF's own mask and positions)."""
    import torch

    from axolotl_gold.data.batching import left_pad
    from axolotl_gold.rollouts.engines.decode_step import DecodeStep
    from axolotl_gold.rollouts.engines.hf import generation_mode

    model = plain_model(ours.student)  # the engine's model: never the compiled wrapper
    ids, mask = (t.to(ours.device) for t in left_pad(prompts, ours.pad))
    decode = DecodeStep(model, ids.shape[0], ids.shape[1] + ours.args.completion, ours.device)
    decode.reset()
    with clock("prefill"), torch.no_grad(), generation_mode(model):
        decode.prefill(ids, mask)


def plain_model(model):
    """The model under a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def split_step(ours, prepared, clock) -> None:
    """One optimizer step, stage by stage (the same arithmetic as Ours.train)."""
    import torch

    from axolotl_gold.scoring.forward import CompletionStates, completion_states
    from axolotl_gold.scoring.routing import objective_sum

    total = max(prepared.local_tokens, 1)
    ours.own_grads()
    for micro in prepared.micro_batches:
        batch = {k: v.to(ours.device, non_blocking=True) for k, v in micro.items()}
        with clock("student forward"):
            student = completion_states(ours.student, batch, use_head_bypass=True)
        trace = generations()
        with clock("teacher forward"), torch.no_grad():
            teacher = completion_states(ours.teacher, batch, use_head_bypass=True)
        trace("teacher forward")
        hidden = student.values.detach().requires_grad_()
        with clock("loss"):
            loss = objective_sum(ours.objective, CompletionStates(hidden, student.head), teacher, batch) / total
        trace("loss")
        with clock("loss backward"):
            loss.backward()
        trace("loss backward")
        with clock("model backward"):
            student.values.backward(hidden.grad)
    with clock("optimizer step"):
        ours.optimizer.step()
    with clock("zero_grad"):
        ours.optimizer.zero_grad(set_to_none=True)


def measure(ours, prepared, prompts, args, plain: bool = False) -> dict:
    """Median ms per optimizer step of each stage over args.steps after args.warmup, and
    ("first step") the student side of the first warm-up step (a compile's warm-up)."""
    from axolotl_gold.scoring.timing import synchronize

    runs, first = [], None
    for index in range(args.warmup + args.steps):
        clock = Clock(ours.device)
        prefill(ours, prompts, clock)
        split_step(ours, prepared, clock)
        if plain:  # bench_cli's loop as it is, the teacher's share taken out
            synchronize(ours.device)
            start = time.perf_counter()
            ours.train(prepared)
            synchronize(ours.device)
            clock.seconds["plain"] = time.perf_counter() - start
        if index == 0:
            first = sum(clock.seconds[s] for s in STUDENT_SIDE)
        if index >= args.warmup:
            runs.append(clock.seconds)
    out = {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}
    out["first step"] = 1e3 * first
    return out


def floors(ours, prepared, prompts) -> dict:
    """Seconds per optimizer step each stage needs at least on an H200, and what bounds it."""
    s_cfg, t_cfg = ours.student.config, ours.teacher.config
    s_lin, t_lin = linear_params(ours.student), linear_params(ours.teacher)
    item = ours.dtype.itemsize
    vocab = ours.args.vocab
    embed = ours.student.get_input_embeddings().weight.numel()  # tied: the head's gradient lands there too
    flops, nbytes = defaultdict(float), defaultdict(float)
    for micro in prepared.micro_batches:
        rows, width = micro["input_ids"].shape
        scored = int((micro["completion_labels"] != -100).sum())
        forward = 2 * s_lin * rows * width + attention_flops(s_cfg, rows, width)
        flops["student forward"] += forward
        nbytes["student forward"] += s_lin * item
        flops["teacher forward"] += 2 * t_lin * rows * width + attention_flops(t_cfg, rows, width)
        nbytes["teacher forward"] += t_lin * item
        flops["loss"] += 2 * scored * vocab * (t_cfg.hidden_size + 3 * s_cfg.hidden_size)  # heads + gradient
        nbytes["loss"] += vocab * (s_cfg.hidden_size + t_cfg.hidden_size) * item
        nbytes["loss backward"] += 2 * item * (vocab * s_cfg.hidden_size + scored * s_cfg.hidden_size)
        flops["model backward"] += 2 * forward * (1.5 if ours.student.is_gradient_checkpointing else 1)
        nbytes["model backward"] += 2 * (s_lin + embed) * item  # weights read, their gradients written
    rows, width = len(prompts), max(map(len, prompts))
    flops["prefill"] = 2 * s_lin * rows * width + attention_flops(s_cfg, rows, width)
    nbytes["prefill"] = s_lin * item
    params = list(ours.student.parameters())
    state = sum(t.numel() * t.element_size() for st in ours.optimizer.state.values()
                for t in st.values() if hasattr(t, "numel") and t.dim())
    nbytes["optimizer step"] = sum(3 * p.numel() * p.element_size() for p in params) + 2 * state
    out = {}
    for stage in STAGES:
        f, b = flops[stage] / H200_FLOPS, nbytes[stage] / H200_BYTES
        out[stage] = (max(f, b), "FLOP" if f >= b else "bytes") if f or b else (0.0, "-")
    return out


def linear_params(model) -> int:
    """Weights of the decoder layers' matmuls (embedding and head apart)."""
    return sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)


def attention_flops(cfg, rows: int, width: int) -> float:
    """Q K^T and P V over a causal [width, width] (half counted), every layer."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * rows * cfg.num_hidden_layers * width * width * cfg.num_attention_heads * head_dim


def stage_table(ms: dict, floor: dict) -> str:
    lines = ["| stage | ms per optimizer step | H200 floor ms | bound by | ratio to floor |",
             "| --- | ---: | ---: | --- | ---: |"]
    for stage in STAGES:
        sec, kind = floor[stage]
        ratio = f"{ms[stage] / (1e3 * sec):.1f}x" if sec else "-"
        lines.append(f"| {stage} | {ms[stage]:.2f} | {1e3 * sec:.3f} | {kind} | {ratio} |")
    side = sum(ms[s] for s in STUDENT_SIDE)
    side_floor = 1e3 * sum(floor[s][0] for s in STUDENT_SIDE)
    lines.append(f"| student side (sum of its stages) | {side:.2f} | {side_floor:.3f} | | {side / side_floor:.1f}x |")
    if "plain" in ms:
        plain = ms["plain"] - ms["teacher forward"]
        lines.append(f"| student side, as the plain loop runs it (teacher taken out) | {plain:.2f} "
                     f"| {side_floor:.3f} | | {plain / side_floor:.1f}x |")
    return "\n".join(lines)


def window_batches(ours, prepared, grouped: bool = False, multiple: int = 1) -> list:
    """The window's micro-batches as the slices were drawn (before ``group_by_length``) or
    grouped as ``prepare_window`` groups them, with widths rounded up to ``multiple``."""
    import torch

    from axolotl_gold.data.batching import group_by_length, merge_repeats
    from axolotl_gold.scoring.loss import teacher_scoring_batch

    merged = [merge_repeats(rows) for rows in prepared.window.slices]
    out = []
    for rows, counts in group_by_length(merged) if grouped else merged:
        batch = teacher_scoring_batch(rows, ours.pad, ours.objective, multiple=multiple)
        if any(c > 1 for c in counts):
            batch["row_weights"] = torch.tensor(counts, dtype=torch.long)
        out.append(batch)
    return out


def variants(ours, args, prepared):
    """(name, context manager that applies the knob, or a reason it is skipped)."""
    import torch

    cuda = ours.device.type == "cuda"

    @contextlib.contextmanager
    def knob(setattr_args=(), optimizer=None, checkpointing=None):
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in setattr_args]
        for obj, name, value in setattr_args:
            setattr(obj, name, value)
        if checkpointing is not None:
            toggle_checkpointing(ours.student, checkpointing)
        old = ours.optimizer
        if optimizer is not None:
            ours.optimizer = optimizer()
        try:
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
            if checkpointing is not None:
                toggle_checkpointing(ours.student, not checkpointing)
            ours.optimizer = old

    drawn = window_batches(ours, prepared)
    rounded = window_batches(ours, prepared, grouped=True, multiple=ROUNDED_TO)
    positions = [sum(b["input_ids"].numel() for b in batches) for batches in (prepared.micro_batches, drawn, rounded)]
    yield (f"{DRAWN_ROW} ({positions[1]:,} padded positions vs {positions[0]:,})",
           knob([(prepared, "micro_batches", drawn)]))
    yield (f"{ROUNDED_ROW} ({positions[2]:,} padded positions vs {positions[0]:,})",
           knob([(prepared, "micro_batches", rounded)]))
    gc = not args.gradient_checkpointing
    yield f"gradient checkpointing {'on' if gc else 'off'}", knob(checkpointing=gc)
    for size in (512, 1024, 2048, 4096, 8192):
        if size != args.chunk_size:
            chunked = dataclasses.replace(ours.objective, chunk_size=size)
            yield f"loss chunk {size}", knob([(ours, "objective", chunked)])
    kind = "foreach" if cuda else "fused"
    make = lambda: torch.optim.AdamW(ours.student.parameters(), lr=1e-6, fused=not cuda, foreach=cuda)  # noqa: E731
    yield f"AdamW {kind} (baseline: {'fused' if cuda else 'for-loop'})", knob(optimizer=make)
    from axolotl_gold.losses.fused import _liger_jsd_function

    if not cuda or _liger_jsd_function() is None:
        yield "Liger fused linear JSD", f"skipped: {'liger_kernel not importable' if cuda else 'CUDA only'}"
    else:
        liger = dataclasses.replace(ours.objective, backend="liger")
        yield "Liger fused linear JSD", knob([(ours, "objective", liger)])
    yield from compile_variants(ours, args, knob, prepared)
    yield from liger_model_variant(ours)


ROUNDED_TO = 64  # gold_scoring_width_multiple's default under reduce-overhead
ROUNDED_ROW = f"scoring widths rounded up to multiples of {ROUNDED_TO}"
COMPILE_ROWS = ("student torch.compile", "student torch.compile + loss chunk 4096",
                "student torch.compile, mode reduce-overhead (CUDA graphs)",
                f"student torch.compile, mode reduce-overhead, widths rounded to {ROUNDED_TO}")
DRAWN_ROW = "rows as drawn, not grouped by length"
LIGER_ROW = "student with Liger's RMSNorm, SwiGLU, RoPE kernels (last: not undone)"


def liger_model_variant(ours):
    """Axolotl's Liger plugin on the student (``liger_rms_norm``, ``liger_glu_activation``,
    ``liger_rope``): its Triton kernels in place of HF's element-wise layers. Applied to the
    model instance (and RoPE to the modeling module, so the teacher's forward too) and not
    undone, so it comes last."""
    import contextlib

    name = LIGER_ROW
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except ImportError:
        yield name, "skipped: liger_kernel not importable"
        return
    if ours.device.type != "cuda":
        yield name, "skipped: CUDA only (Triton kernels)"
        return

    @contextlib.contextmanager
    def applied():
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=plain_model(ours.student))
        yield

    yield name, applied()


def compile_variants(ours, args, knob, prepared):
    """The student as Axolotl's ``torch_compile: true`` leaves it for the trainer's forward
    and backward: Accelerate's ``prepare`` returns ``torch.compile(model, backend="inductor")``
    (HF's Trainer passes ``torch_compile_backend``, inductor by default, and
    ``torch_compile_mode``, None: no mode). One wrapper for both rows: the second reuses
    the first's graphs (a changed loss chunk does not touch the model's)."""
    import torch

    compiled = torch.compile(plain_model(ours.student), backend="inductor")
    yield COMPILE_ROWS[0], knob([(ours, "student", compiled)])
    if args.chunk_size != 4096:
        chunked = dataclasses.replace(ours.objective, chunk_size=4096)
        yield COMPILE_ROWS[1], knob([(ours, "student", compiled), (ours, "objective", chunked)])
    # `torch_compile_mode: reduce-overhead`: inductor's CUDA graphs (cudagraph trees) around
    # the forward and the backward, one recorded per input shape; on CPU it compiles without them
    graphed = torch.compile(plain_model(ours.student), backend="inductor", mode="reduce-overhead")
    yield COMPILE_ROWS[2], knob([(ours, "student", graphed), (ours, "graphed", True)])
    # as the trainer runs it by default under reduce-overhead: fewer shapes to record
    rounded = window_batches(ours, prepared, grouped=True, multiple=ROUNDED_TO)
    yield COMPILE_ROWS[3], knob([(ours, "student", graphed), (ours, "graphed", True),
                                 (prepared, "micro_batches", rounded)])


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def toggle_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def variant_table(rows: list[tuple[str, dict | str]], base: dict) -> str:
    cols = STUDENT_SIDE
    lines = ["| variant | " + " | ".join(cols) + " | student side ms | vs baseline |",
             "| --- |" + " ---: |" * (len(cols) + 2)]
    side = lambda ms: sum(ms[s] for s in cols)  # noqa: E731
    for name, ms in [("baseline", base), *rows]:
        if isinstance(ms, str):
            lines.append(f"| {name} | {ms} |" + " |" * (len(cols) + 1))
            continue
        lines.append(f"| {name} | " + " | ".join(f"{ms[s]:.2f}" for s in cols)
                     + f" | {side(ms):.2f} | {side(ms) / side(base):.2f}x |")
    return "\n".join(lines)


def kernel_table(ours, prepared, prompts, top: int = 25) -> str:
    """One step under torch.profiler: the top kernels by total device time (CPU: ops)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = ours.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        clock = Clock(ours.device)
        prefill(ours, prompts, clock)
        split_step(ours, prepared, clock)
    events = prof.key_averages()
    if cuda:  # kernels are the events on the device; else (older profilers) ops by self device time
        events = [e for e in events if e.device_type == DeviceType.CUDA] or list(events)
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    events = sorted(events, key=time_of, reverse=True)
    total = sum(time_of(e) for e in events) or 1
    wall = 1e3 * sum(clock.seconds.values())  # the same stages, device-synced, under the profiler
    busy = (f"; kernels {total / 1e3:.1f} ms of device time in {wall:.1f} ms of wall time for these stages "
            f"(device busy {100 * total / 1e3 / wall:.0f}%)") if cuda else ""
    lines = [f"top {top} {'CUDA kernels' if cuda else 'CPU ops (self time)'} of one step (prefill + student "
             f"side + teacher), by total time{busy}", "", "| kernel | calls | total ms | share |",
             "| --- | ---: | ---: | ---: |"]
    for e in events[:top]:
        name = e.key.replace("|", "/")[:110]
        lines.append(f"| {name} | {e.count} | {time_of(e) / 1e3:.2f} | {100 * time_of(e) / total:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    own, args, bvr = parse_args(sys.argv[1:] if argv is None else argv)
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
              f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.steps} step(s) after {args.warmup}")
    print("\n" + header + "\n\n" + stage_table(ms, floor), flush=True)
    result = {"stages_ms": ms, "floors_ms": {k: 1e3 * v[0] for k, v in floor.items()},
              "floor_bound": {k: v[1] for k, v in floor.items()}, "args": vars(args)}
    if own.variants:
        rows = []
        for name, knob in variants(ours, args, prepared):
            kept = name in (*COMPILE_ROWS, LIGER_ROW) or name.startswith((DRAWN_ROW, ROUNDED_ROW))
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
                if name in COMPILE_ROWS:
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

            ours.student = torch.compile(plain_model(ours.student), backend="inductor")
            for _ in range(2):
                split_step(ours, prepared, Clock(ours.device))
            title = " (student through torch.compile)"
        print("\n" + kernel_table(ours, prepared, prompts).replace("by total time", "by total time" + title, 1),
              flush=True)
    if own.json:
        Path(own.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
