"""The Triton JSD kernel alone on one chunk of logits: time and effective bandwidth per setting.

    python benchmarks/bench_triton_jsd.py [--rows 1024] [--vocab 151936]

Prints one row per (BLOCK, num_warps): milliseconds per chunk and the
bandwidth that three reads of both logits rows and one write of the gradient correspond to.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import torch

    import axolotl_gold.losses.triton_jsd as kernel

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(args.rows, args.vocab, device="cuda", generator=g).mul_(3).bfloat16()
    t = torch.randn(args.rows, args.vocab, device="cuda", generator=g).mul_(3).bfloat16()
    moved = 7 * s.numel() * s.element_size()  # 3 reads of s and t, 1 write
    print("| BLOCK | warps | ms per chunk | effective TB/s |\n| ---: | ---: | ---: | ---: |")
    for block, warps in ((512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
        kernel.BLOCK, kernel.NUM_WARPS = block, warps
        ms = _time(kernel, s, t, args.repeats)
        print(f"| {block} | {warps} | {ms:.3f} | {moved / ms / 1e9:.2f} |")


def _time(kernel, s, t, repeats):
    """Milliseconds per call of the kernel on a fresh copy of ``s``."""
    import torch

    for _ in range(2):
        kernel.jsd_rows_and_grad_(s.clone(), t, 0.5, 1.0)
    copies = [s.clone() for _ in range(repeats)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for x in copies:
        kernel.jsd_rows_and_grad_(x, t, 0.5, 1.0)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


if __name__ == "__main__":
    main()
