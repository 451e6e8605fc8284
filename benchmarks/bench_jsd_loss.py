"""Time and peak memory of the same-tokenizer JSD loss, forward + backward, from hidden states.

Methods:
  plain    full [N, V] logits for both models, generalized_jsd_token_loss(...).sum(), autograd
  chunked  axolotl_gold's chunked_jsd_loss_sum (torch, closed-form gradient per chunk;
           torch.compile fuses the elementwise work on CUDA)
           (on CUDA without head biases, the per-chunk divergence and gradient run in our
           Triton kernel, losses/triton_jsd.py)
  chunked-compiled  the same with the torch.compile tensor version instead of the kernel
  chunked-eager  the same without torch.compile or the kernel (not run unless named in --methods)
  liger    liger-kernel's fused linear JSD through fused_jsd_loss_sum(backend="liger"); CUDA only
  floor    only the lm_head matmuls, chunked like `chunked`: student forward, teacher forward,
           student backward into hidden and weight. No loss can be cheaper than this.

Each method runs in its own subprocess so that memory readings do not mix:
  CUDA: torch.cuda.max_memory_allocated() minus the memory allocated once inputs exist.
  CPU:  the process's peak RSS (getrusage ru_maxrss) minus its RSS once inputs exist, with
        glibc told to return every block over 64 KiB to the OS on free (MALLOC_MMAP_THRESHOLD_).
        It still counts allocator slack and library workspaces, so it is an upper bound on live tensors;
        a value marked "<=" means the peak was set before the method ran (setup), so the
        method's true peak is at most that.
Both include the warm-up run and the produced gradients.

The ratio to the floor is also taken in one process (--interleave N): chunked and floor
alternately, N rounds, the median of the per-round ratios.

CPU, small:  python benchmarks/bench_jsd_loss.py
GPU, Qwen2.5-0.5B student / 1.5B teacher sized:
  python benchmarks/bench_jsd_loss.py --device cuda --tokens 4096 --hidden 896 \\
      --teacher-hidden 1536 --vocab 151936 --dtype bf16 --chunk-size 1024 --interleave 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("plain", "chunked", "chunked-compiled", "liger", "floor")
OPTIONAL_METHODS = ("chunked-eager",)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--tokens", type=int, default=1024, help="scored tokens N")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden size (default: --hidden)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS + OPTIONAL_METHODS)
    )
    parser.add_argument(
        "--triton", default="", help="BLOCK:WARPS[:GROUP] for the Triton kernel (GROUP: chunks per lm_head backward matmul); "
        "default: the modules' settings",
    )
    parser.add_argument(
        "--interleave", type=int, default=0,
        help="also time chunked and floor alternately in one process for this many rounds (both must be in --methods)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.teacher_hidden is None:
        args.teacher_hidden = args.hidden
    return args


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_child(args) -> dict:
    import torch

    from axolotl_gold.losses import chunked_jsd_loss_sum, fused_jsd_loss_sum, generalized_jsd_token_loss

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    # Scaled so logits spread over a few nats, like a trained model's.
    student_hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype).requires_grad_()
    student_weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype).mul_(2 * args.hidden**-0.5)
    student_weight.requires_grad_()
    teacher_hidden = torch.randn(args.tokens, args.teacher_hidden, device=device, dtype=dtype)
    teacher_weight = torch.randn(args.vocab, args.teacher_hidden, device=device, dtype=dtype)
    teacher_weight.mul_(2 * args.teacher_hidden**-0.5)
    kw = dict(beta=args.beta, temperature=args.temperature)

    def plain():
        student_logits = student_hidden @ student_weight.t()
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        loss = generalized_jsd_token_loss(student_logits, teacher_logits, **kw).sum()
        loss.backward()
        return loss

    def chunked():
        loss = chunked_jsd_loss_sum(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    chunk_size=args.chunk_size, **kw)
        loss.backward()
        return loss

    def liger():
        loss = fused_jsd_loss_sum(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  chunk_size=args.chunk_size, backend="liger", **kw)
        loss.backward()
        return loss

    def floor():
        with torch.no_grad():
            grad_hidden = torch.empty_like(student_hidden)
            grad_weight = torch.zeros_like(student_weight)
            for start in range(0, args.tokens, args.chunk_size):
                h = student_hidden[start : start + args.chunk_size]
                student_logits = h @ student_weight.t()
                teacher_logits = teacher_hidden[start : start + args.chunk_size] @ teacher_weight.t()
                # The student logits stand in for dL/dlogits: same shape and dtype, no loss math.
                grad_hidden[start : start + args.chunk_size] = student_logits @ student_weight
                grad_weight.addmm_(student_logits.t(), h)
                del teacher_logits
            student_hidden.grad, student_weight.grad = grad_hidden, grad_weight
        return torch.zeros(())

    if args.triton:
        from axolotl_gold.losses import triton_jsd

        import axolotl_gold.losses.chunked as chunked_module

        block, warps, *group = (int(x) for x in args.triton.split(":"))
        triton_jsd.BLOCK, triton_jsd.NUM_WARPS = block, warps
        if group:
            chunked_module.MATMUL_GROUP = group[0]
    if args.child in ("chunked-eager", "chunked-compiled"):
        import axolotl_gold.losses.chunked as chunked_module

        chunked_module.USE_TRITON = False
        chunked_module.COMPILE_ON_CUDA = args.child == "chunked-compiled"
    def sync():
        if cuda:
            torch.cuda.synchronize()

    def clear():
        student_hidden.grad = None
        student_weight.grad = None

    def timed(f) -> float:
        sync()
        start = time.perf_counter()
        f()
        sync()
        clear()
        return (time.perf_counter() - start) * 1e3

    if args.child == "interleaved":
        # chunked and floor alternately in this one process, so clock and thermal drift hit
        # both alike: per round the ratio of the two, then the median over rounds.
        for f in (chunked, floor):
            f()
            clear()
        rounds = [(timed(chunked), timed(floor)) for _ in range(args.repeats)]
        ratios = sorted(c / f for c, f in rounds)
        return {"method": "interleaved", "chunked_ms": statistics.median(c for c, _ in rounds),
                "floor_ms": statistics.median(f for _, f in rounds), "ratio": statistics.median(ratios),
                "ratio_min": ratios[0], "ratio_max": ratios[-1], "rounds": len(rounds)}

    fn = {"plain": plain, "chunked": chunked, "chunked-eager": chunked, "chunked-compiled": chunked,
          "liger": liger, "floor": floor}[args.child]

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, peak_before = _rss_bytes(), _peak_rss_bytes()

    warmups = 3 if args.child == "liger" else 1  # liger's torch.compile needs a few calls to settle
    for _ in range(warmups):
        loss = fn()
        clear()
    times = [timed(fn) for _ in range(args.repeats)]

    if cuda:
        extra, bound = torch.cuda.max_memory_allocated() - base, False
    else:
        peak = _peak_rss_bytes()
        extra, bound = max(peak - base, 0), peak <= peak_before
    import axolotl_gold.losses.chunked as chunked_module

    return {"method": args.child, "ms": statistics.median(times), "extra_bytes": extra,
            "upper_bound": bound, "loss": float(loss), "mixed_addmm": chunked_module._mixed_addmm_works}


def spawn(args, method, **overrides) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", method]
    for name in ("device", "tokens", "hidden", "teacher_hidden", "vocab", "dtype", "chunk_size", "repeats",
                 "beta", "temperature", "triton"):
        argv += ["--" + name.replace("_", "-"), str(overrides.get(name, getattr(args, name)))]
    env = dict(os.environ)
    # glibc otherwise keeps freed blocks of up to 32 MiB in its heap, which RSS would count as used.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS + OPTIONAL_METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS + OPTIONAL_METHODS}")
    results = {}
    for method in methods:
        if method == "liger" and args.device == "cpu":
            results[method] = {"method": method, "error": "CUDA only"}
            continue
        results[method] = spawn(args, method)

    print(f"tokens={args.tokens} hidden={args.hidden} teacher_hidden={args.teacher_hidden} vocab={args.vocab} "
          f"dtype={args.dtype} device={args.device} chunk_size={args.chunk_size} beta={args.beta} "
          f"temperature={args.temperature} triton={args.triton or 'default'}; median of {args.repeats} runs after warm-up, forward + backward\n")
    memory_label = "peak extra GPU memory" if args.device != "cpu" else "peak extra RSS"
    print(f"| method | ms | x plain | x floor | {memory_label} (MiB) | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    plain_ms = results.get("plain", {}).get("ms")
    floor_ms = results.get("floor", {}).get("ms")
    for method in methods:
        r = results[method]
        if "error" in r:
            print(f"| {method} | {r['error']} | | | | |")
            continue
        ratio_plain = f"{r['ms'] / plain_ms:.2f}" if plain_ms else "-"
        ratio_floor = f"{r['ms'] / floor_ms:.2f}" if floor_ms else "-"
        memory = ("<= " if r["upper_bound"] else "") + f"{r['extra_bytes'] / 2**20:.0f}"
        loss = "-" if method == "floor" else f"{r['loss']:.6g}"
        print(f"| {method} | {r['ms']:.1f} | {ratio_plain} | {ratio_floor} | {memory} | {loss} |")
    if args.interleave and "chunked" in methods and "floor" in methods:
        r = spawn(args, "interleaved", repeats=args.interleave)
        if "error" in r:
            print(f"\ninterleaved timing failed: {r['error']}")
        else:
            print(f"\nchunked and floor interleaved in one process, {r['rounds']} rounds: chunked "
                  f"{r['chunked_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms; chunked / floor per round: "
                  f"median {r['ratio']:.3f}, range {r['ratio_min']:.3f} to {r['ratio_max']:.3f}")
    if any(r.get("mixed_addmm") is False for r in results.values()):
        print("\nnote: cuBLAS bf16 x bf16 -> float32 addmm was unavailable; a slower fallback ran")


if __name__ == "__main__":
    main()
