"""profile_student_step.py --variants: one knob per row (rows as drawn, widths rounded,
gradient checkpointing, loss chunk sizes, AdamW, Liger's fused JSD, cuDNN's attention, the
padding mask, torch.compile with and without CUDA graphs, Axolotl's full fine-tune dtypes,
Liger's model kernels), each a context manager around ``measure``.
"""

from __future__ import annotations

import contextlib
import dataclasses

from student_stages import STUDENT_SIDE, UNSYNCED, plain_model, window_batches

ROUNDED_TO = 64  # gold_scoring_width_multiple's default under reduce-overhead
ROUNDED_ROW = f"scoring widths rounded up to multiples of {ROUNDED_TO}"
COMPILE_ROWS = ("student torch.compile", "student torch.compile + loss chunk 4096",
                "student torch.compile, mode reduce-overhead (CUDA graphs)",
                f"student torch.compile, mode reduce-overhead, widths rounded to {ROUNDED_TO}",
                "student torch.compile, mode reduce-overhead, padding mask (rows not rolled)",
                "student torch.compile, mode max-autotune (GEMMs autotuned, CUDA graphs)")
DRAWN_ROW = "rows as drawn, not grouped by length"
CUDNN_ROW = "cuDNN attention allowed in the student's step (trainer.attention_backends undone)"
MASK_ROW = "padding mask: rows not rolled left (scoring.causal_rows undone)"
LIGER_ROW = "student with Liger's RMSNorm, SwiGLU, RoPE kernels (last: not undone)"


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
    from axolotl_gold.trainer import attention_backends

    # what excluding cuDNN's attention from the step costs (the window's widths may be of those
    # where its backward gives NaN: then the row's times are of a NaN step)
    yield CUDNN_ROW, knob([(attention_backends, "EXCLUDE_CUDNN_ATTENTION", False)])
    from axolotl_gold.scoring import causal_rows

    # the layout before the rows were rolled: attention with the batch's padding mask
    yield MASK_ROW, knob([(causal_rows, "ROLL_ROWS", False)])
    yield from compile_variants(ours, args, knob, prepared)
    yield from axolotl_dtype_variants(ours)
    yield from liger_model_variant(ours)


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
    from axolotl_gold.scoring import causal_rows

    # the graphed student on the masked layout (its own graphs: the forward differs)
    yield COMPILE_ROWS[4], knob([(ours, "student", graphed), (ours, "graphed", True),
                                 (causal_rows, "ROLL_ROWS", False)])
    # `torch_compile_mode: max-autotune`: inductor times Triton GEMM templates against cuBLAS for
    # each matmul's shape and keeps the faster, CUDA graphs as under reduce-overhead (minutes of
    # compiling; on CPU it would time C++ templates instead: not what a user's GPU run does)
    if ours.device.type != "cuda":
        yield COMPILE_ROWS[5], "skipped: CUDA only (the GEMM templates timed are Triton's)"
        return
    tuned = torch.compile(plain_model(ours.student), backend="inductor", mode="max-autotune")
    yield COMPILE_ROWS[5], knob([(ours, "student", tuned), (ours, "graphed", True)])


AXOLOTL_ROWS = ("Axolotl's full fine-tune dtypes (embeddings, lm_head, norms float32; bf16 autocast)",
                "Axolotl's full fine-tune dtypes, mode reduce-overhead",
                "Axolotl's full fine-tune dtypes, mode reduce-overhead, embedding output cast to bf16")


def axolotl_dtype_variants(ours):
    """The student as `axolotl train` runs a bf16 full fine-tune: Axolotl's loader keeps the
    embeddings, the lm_head and every module named ``*norm*`` in float32
    (``ModelLoader._convert_embedding_modules_dtype``) and Accelerate runs the forward under bf16
    autocast. A float32 embedding makes the whole residual stream float32 (each layer's bf16
    output added to it), which the bf16 model of the other rows does not carry. Eager, graphed
    (its own wrapper: other dtypes), and graphed with the embedding's output cast to bf16 (the
    float32 weights kept, the residual stream bf16 again)."""
    import torch

    cuda = ours.device.type == "cuda"

    @contextlib.contextmanager
    def axolotl_dtypes(mode=None, residual_bf16=False):
        model = plain_model(ours.student)
        upcast = [m for n, m in model.named_modules()
                  if ("norm" in n or n.endswith(("embed_tokens", "lm_head"))) and hasattr(m, "weight")]
        saved = (ours.student, ours.optimizer, ours.graphed)
        for module in upcast:
            module.to(torch.float32)
        hook = (model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.to(torch.bfloat16))
                if residual_bf16 else None)
        ours.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)  # float32 states for those
        if mode is not None:
            ours.student = torch.compile(model, backend="inductor", mode=mode)
            ours.graphed = mode == "reduce-overhead"
        try:
            with torch.autocast(ours.device.type, dtype=torch.bfloat16):
                yield
        finally:
            if hook is not None:
                hook.remove()
            for module in upcast:
                module.to(ours.dtype)
            ours.student, ours.optimizer, ours.graphed = saved

    yield AXOLOTL_ROWS[0], axolotl_dtypes()
    yield AXOLOTL_ROWS[1], axolotl_dtypes("reduce-overhead")
    yield AXOLOTL_ROWS[2], axolotl_dtypes("reduce-overhead", residual_bf16=True)


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
    lines = ["| variant | " + " | ".join(cols) + " | student side ms | vs baseline | no waits between stages ms |",
             "| --- |" + " ---: |" * (len(cols) + 3)]
    side = lambda ms: sum(ms[s] for s in cols)  # noqa: E731
    for name, ms in [("baseline", base), *rows]:
        if isinstance(ms, str):
            lines.append(f"| {name} | {ms} |" + " |" * (len(cols) + 2))
            continue
        lines.append(f"| {name} | " + " | ".join(f"{ms[s]:.2f}" for s in cols)
                     + f" | {side(ms):.2f} | {side(ms) / side(base):.2f}x | {ms[UNSYNCED]:.2f} |")
    return "\n".join(lines)
