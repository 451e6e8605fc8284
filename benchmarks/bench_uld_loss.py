"""Time and peak memory of one cross-tokenizer ULD step: ours (chunked) vs the reference.

The step starts from both models' last hidden states and lm_head weights and ends after
backward (gradients of the student hidden states and lm_head):

- ours: ``align_completion`` on the byte offsets, then ``uld_loss_sum`` (chunked logits);
- reference: full ``[batch, seq, vocab]`` logits of both models, then
  ``trl.experimental.gold.gold_trainer.ULDLoss``.

Both use the "bayesian" merge on the same random inputs (two random tokenizations of one
text per sequence). Ratios are against the reference measured in the same process.

    python benchmarks/bench_uld_loss.py                       # CPU defaults, a few minutes
    python benchmarks/bench_uld_loss.py --device cuda --student-hidden 2048 --teacher-hidden 4096

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the peak
resident set size above the level before the step, sampled every 2 ms from /proc (an
approximation that sees large tensors, which is what matters here).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from axolotl_gold.crosstok.alignment import align_completion  # noqa: E402
from axolotl_gold.losses.uld import ULDConfig, VocabMapping, completion_rows  # noqa: E402
from axolotl_gold.losses.uld_fused import uld_loss_sum  # noqa: E402


def random_offsets(rng: random.Random, n_bytes: int, n_tokens: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n_bytes), n_tokens - 1))
    bounds = [0, *cuts, n_bytes]
    return list(zip(bounds, bounds[1:], strict=False))


def make_inputs(args, vocab: int, device, dtype):
    """Per sequence: a prompt, a completion of ``args.tokens`` student tokens and about 0.8x as
    many teacher tokens over the same bytes; hidden states and lm_heads of both models."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    vs, vt = vocab, vocab + vocab // 16  # different vocabularies, as across model families
    prompt = args.prompt_tokens
    rows = []
    for _ in range(args.batch):
        n_bytes = 4 * args.tokens
        s_off = random_offsets(rng, n_bytes, args.tokens)
        t_off = random_offsets(rng, n_bytes, int(0.8 * args.tokens))
        rows.append((s_off, t_off))
    s_len = prompt + args.tokens
    t_len = prompt + max(len(t) for _, t in rows)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = SimpleNamespace(
        rows=rows,
        prompt=prompt,
        s_hidden=randn(args.batch, s_len, args.student_hidden).requires_grad_(),
        t_hidden=randn(args.batch, t_len, args.teacher_hidden),
        s_weight=randn(vs, args.student_hidden, scale=3 / args.student_hidden**0.5).requires_grad_(
            not args.frozen_lm_head
        ),
        t_weight=randn(vt, args.teacher_hidden, scale=3 / args.teacher_hidden**0.5),
        s_ids=torch.randint(0, vs, (args.batch, s_len), generator=gen).to(device),
        t_ids=torch.randint(0, vt, (args.batch, t_len), generator=gen).to(device),
    )
    inputs.mapping = None
    if args.hybrid:  # every other id of the first half of the teacher vocabulary is shared
        teacher_ids = torch.arange(0, vt // 2, 2)
        inputs.mapping = VocabMapping(student_ids=teacher_ids.clone() % vs, teacher_ids=teacher_ids)
    return inputs


def ours_step(inputs, args):
    s_groups, t_groups, s_rows, t_rows, s_ids, t_ids = [], [], [], [], [], []
    for b, (s_off, t_off) in enumerate(inputs.rows):
        sg, tg = align_completion(s_off, t_off)
        s_groups.append(sg)
        t_groups.append(tg)
        p = inputs.prompt
        s_rows.append(completion_rows(inputs.s_hidden[b], p, len(s_off)))
        t_rows.append(completion_rows(inputs.t_hidden[b], p, len(t_off)))
        s_ids.append(inputs.s_ids[b, p : p + len(s_off)])
        t_ids.append(inputs.t_ids[b, p : p + len(t_off)])
    cfg = ULDConfig(chunk_size=args.chunk_size, hybrid_beta=0.5)
    loss_sum, positions = uld_loss_sum(
        s_rows, inputs.s_weight, t_rows, inputs.t_weight, s_ids, t_ids, s_groups, t_groups, cfg, inputs.mapping
    )
    (loss_sum / positions).backward()
    return loss_sum.detach() / positions


def reference_step(inputs, args):
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5,
    )
    loss_fn = ULDLoss(config)
    if inputs.mapping is not None:  # what _initialize_vocabulary_mapping would build from tokenizers
        loss_fn.use_hybrid_loss = True
        t_ids, s_ids = inputs.mapping.teacher_ids.tolist(), inputs.mapping.student_ids.tolist()
        loss_fn._vocab_mapping = dict(zip(t_ids, s_ids, strict=True))
        loss_fn._teacher_matched_ids, loss_fn._student_matched_ids = set(t_ids), set(s_ids)
        loss_fn.mapping_tensor = torch.full((max(t_ids) + 1,), -1, dtype=torch.long)
        loss_fn.mapping_tensor[inputs.mapping.teacher_ids] = inputs.mapping.student_ids
        loss_fn.mapping_tensor = loss_fn.mapping_tensor.to(inputs.s_hidden.device)

    batch, s_len, _ = inputs.s_hidden.shape
    t_len = inputs.t_hidden.shape[1]
    device = inputs.s_hidden.device
    s_labels = torch.full((batch, s_len), -100, dtype=torch.long, device=device)
    t_labels = torch.full((batch, t_len), -100, dtype=torch.long, device=device)
    s_offsets = torch.zeros(batch, s_len, 2, dtype=torch.long, device=device)
    t_offsets = torch.zeros(batch, t_len, 2, dtype=torch.long, device=device)
    p = inputs.prompt
    for b, (s_off, t_off) in enumerate(inputs.rows):
        s_labels[b, p : p + len(s_off)] = inputs.s_ids[b, p : p + len(s_off)]
        t_labels[b, p : p + len(t_off)] = inputs.t_ids[b, p : p + len(t_off)]
        s_offsets[b, p : p + len(s_off)] = torch.tensor(s_off, device=device)
        t_offsets[b, p : p + len(t_off)] = torch.tensor(t_off, device=device)

    s_logits = inputs.s_hidden @ inputs.s_weight.T
    with torch.no_grad():
        t_logits = inputs.t_hidden @ inputs.t_weight.T
    loss = loss_fn(
        student_logits=s_logits, teacher_logits=t_logits, student_labels=s_labels, teacher_labels=t_labels,
        student_input_ids=inputs.s_ids, teacher_input_ids=inputs.t_ids,
        student_byte_offsets=s_offsets, teacher_byte_offsets=t_offsets,
    )
    loss.backward()
    return loss.detach()


class PeakMemory:
    """Peak memory above the level at entry (bytes)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._rss()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(step, inputs, args, repeats: int, device):
    times, peaks, value = [], [], None
    for _ in range(repeats):
        inputs.s_hidden.grad = inputs.s_weight.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            value = step(inputs, args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
    return statistics.median(times), max(peaks), float(value)


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--vocab-sizes", default="32000,151936", help="comma-separated student vocabulary sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="student completion tokens per sequence")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--student-hidden", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="default: 4096 on CUDA, 384 on CPU")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--chunk-size", type=int, default=None, help="aligned positions per chunk (default: auto)")
    parser.add_argument("--hybrid", action="store_true", help="hybrid ULD with a synthetic vocabulary mapping")
    parser.add_argument("--frozen-lm-head", action="store_true", help="no lm_head gradient (LoRA students)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of ours (default 5 CUDA, 2 CPU)")
    parser.add_argument("--reference-repeats", type=int, default=None, help="(default 3 CUDA, 1 CPU)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--reference-max-vocab", type=int, default=None,
        help="run the reference only up to this vocabulary (default: all on CUDA, 64000 on CPU, where the "
        "reference at 152k needs >10 GB and many minutes)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.student_hidden = args.student_hidden or (2048 if on_cuda else 256)
    args.teacher_hidden = args.teacher_hidden or (4096 if on_cuda else 384)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    repeats = args.repeats or (5 if on_cuda else 2)
    ref_repeats = args.reference_repeats or (3 if on_cuda else 1)
    ref_max = args.reference_max_vocab or (10**9 if on_cuda else 64000)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"device={device} dtype={dtype} batch={args.batch} tokens={args.tokens} hidden={args.student_hidden}/"
        f"{args.teacher_hidden} loss={'hybrid ULD' if args.hybrid else 'ULD'} frozen_lm_head={args.frozen_lm_head} "
        f"chunk={args.chunk_size or 'auto'} threads={torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    for vocab in (int(v) for v in args.vocab_sizes.split(",")):
        inputs = make_inputs(args, vocab, device, dtype)
        measure(ours_step, inputs, args, 1, device)  # warm-up
        ours = measure(ours_step, inputs, args, repeats, device)
        print(f"  vocab {vocab}: ours {ours[0]:.2f} s, {ours[1] / 2**20:.0f} MiB", flush=True)
        ref = None
        if not args.skip_reference and vocab <= ref_max:
            try:
                ref = measure(reference_step, inputs, args, ref_repeats, device)
                print(f"  vocab {vocab}: reference {ref[0]:.2f} s, {ref[1] / 2**20:.0f} MiB", flush=True)
            except ImportError as err:
                print(f"  reference unavailable ({err}); use --skip-reference", flush=True)
                args.skip_reference = True
        rows.append((vocab, ours, ref))
        del inputs
        gc.collect()

    print()
    print("| vocab (student/teacher) | impl | step time (s) | peak mem (MiB) | time vs ref | mem vs ref |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for vocab, ours, ref in rows:
        label = f"{vocab} / {vocab + vocab // 16}"
        if ref is not None:
            print(f"| {label} | reference | {ref[0]:.2f} | {ref[1] / 2**20:.0f} | 1.00x | 1.00x |")
            print(
                f"| {label} | ours | {ours[0]:.2f} | {ours[1] / 2**20:.0f} | {ref[0] / ours[0]:.1f}x faster "
                f"| {ours[1] / max(ref[1], 1):.3f}x |"
            )
        else:
            print(f"| {label} | ours | {ours[0]:.2f} | {ours[1] / 2**20:.0f} | (no ref) | (no ref) |")


if __name__ == "__main__":
    main()
