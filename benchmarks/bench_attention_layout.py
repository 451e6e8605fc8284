"""One attention layer's forward and backward as the scoring forward runs it, per layout.

HF's ``sdpa`` path on a left-padded batch (the masked layout): the KV heads repeated to the
query heads and a boolean ``[B, 1, T, T]`` causal-and-padding mask, which keeps SDPA off its
flash kernel. The rows rolled left (``scoring.causal_rows``): no mask, ``is_causal``, and the
KV heads either passed as they are (``enable_gqa``, what HF does without a mask on CUDA) or
repeated. Each variant is timed alone (CUDA events, median of --iters after --warmup) beside
the kernels the profiler saw it launch, at the student's and the teacher's head shapes of the
benchmark (0.5B: 14 query / 2 KV heads of 64; 1.5B: 12 / 2 of 128), micro batch 4 x 1024.

    python3 benchmarks/bench_attention_layout.py [--rows 4] [--width 1024] [--json OUT.json]
CPU smoke test: --device cpu --width 64 --iters 2 (timings meaningless there).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"student 0.5B (14 / 2 heads of 64)": (14, 2, 64), "teacher 1.5B (12 / 2 heads of 128)": (12, 2, 128)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def left_padded_mask(rows: int, width: int, device) -> torch.Tensor:
    """``[B, 1, T, T]`` causal and padding mask of rows whose lengths run from half to all of T."""
    lengths = torch.linspace(width // 2, width, rows, device=device).long()
    keys = torch.arange(width, device=device)
    real = keys[None, :] >= (width - lengths)[:, None]  # left padding
    causal = keys[None, :] <= keys[:, None]
    return (causal[None] & real[:, None, :])[:, None]


def variants(mask):
    def masked(q, k, v):  # HF's sdpa path with a mask: KV heads repeated
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                              attn_mask=mask)

    def causal_gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def causal_repeated(q, k, v):
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                              is_causal=True)

    return {"padding mask (KV repeated)": masked, "rolled: is_causal, enable_gqa": causal_gqa,
            "rolled: is_causal, KV repeated": causal_repeated}


def time_variant(fn, q, k, v, args) -> tuple[float, float, list[str]]:
    """(forward ms, forward + backward ms, kernels of one forward + backward)."""
    def fwd():
        return fn(q, k, v)

    def both():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))

    timings = []
    for step in (fwd, both):
        for _ in range(args.warmup):
            step()
        samples = []
        for _ in range(args.iters):
            if q.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                step()
                samples.append(1e3 * (time.perf_counter() - t0))
        timings.append(statistics.median(samples))
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if q.is_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        both()
        if q.is_cuda:
            torch.cuda.synchronize()
    words = ("attention", "flash", "fmha", "cudnn")
    kinds = sorted({e.key[:70] for e in prof.key_averages() if any(w in e.key.lower() for w in words)
                    and not e.key.startswith("autograd::") and "Backward0" not in e.key})
    return timings[0], timings[1], kinds


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mask = left_padded_mask(args.rows, args.width, device)
    result, lines = {}, ["| shape | variant | forward ms | forward + backward ms | vs padding mask | kernels |",
                         "| --- | --- | ---: | ---: | ---: | --- |"]
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        g = torch.Generator(device=device).manual_seed(0)
        make = lambda h: torch.randn(args.rows, h, args.width, dim, device=device, dtype=dtype,  # noqa: E731
                                     generator=g).requires_grad_()
        q, k, v = make(heads), make(kv_heads), make(kv_heads)
        base = None
        for name, fn in variants(mask).items():
            fwd, both, kernels = time_variant(fn, q, k, v, args)
            base = both if base is None else base
            result[f"{shape} / {name}"] = {"forward_ms": fwd, "forward_backward_ms": both, "kernels": kernels}
            lines.append(f"| {shape} | {name} | {fwd:.3f} | {both:.3f} | {both / base:.2f}x | {'; '.join(kernels)} |")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}; {args.rows} rows x {args.width} columns, {dtype}; median of {args.iters}\n")
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
