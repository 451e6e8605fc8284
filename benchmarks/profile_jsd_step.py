"""Where the time of one fused JSD loss step goes: a torch.profiler table of GPU kernels.

    python benchmarks/profile_jsd_step.py [--tokens 4096 --hidden 896 --teacher-hidden 1536 --vocab 151936]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from axolotl_gold.losses.chunked import chunked_jsd_loss_sum

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--teacher-hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk-size", type=int, default=1024)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    sh = torch.randn(args.tokens, args.hidden, device=dev, dtype=dt, requires_grad=True)
    sw = (torch.randn(args.vocab, args.hidden, device=dev) * args.hidden**-0.5 * 2).to(dt).requires_grad_()
    th = torch.randn(args.tokens, args.teacher_hidden, device=dev, dtype=dt)
    tw = (torch.randn(args.vocab, args.teacher_hidden, device=dev) * args.teacher_hidden**-0.5 * 2).to(dt)

    def step():
        loss = chunked_jsd_loss_sum(sh, sw, th, tw, beta=0.5, temperature=1.0, chunk_size=args.chunk_size)
        loss.backward()
        sh.grad = sw.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
