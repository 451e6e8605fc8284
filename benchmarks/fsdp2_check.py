"""GOLD under FSDP2 (``fully_shard``) on several processes: gradients against one process, and memory.

Run with torchrun::

    torchrun --nproc_per_node 2 benchmarks/fsdp2_check.py                 # 2 CPU processes, gloo
    torchrun --nproc_per_node 2 benchmarks/fsdp2_check.py --device cuda   # 2 GPUs, NCCL

Part 1, correctness (float32, a small Llama pair): one GOLD optimizer window under FSDP2
(student sharded per decoder layer + root as Axolotl / Accelerate shard it, teacher sharded
for inference by ``shard_teacher``, loaded on rank 0 only and built on ``meta`` elsewhere,
the output heads gathered once per micro-step by ``gathered_heads`` for the fused loss, the
student unsharded once for the window's rollouts by ``generation_weights``) against the same
window in one process without FSDP. The window is ``world x (micro, accum)`` under FSDP2 and
``(micro * accum * world, 1)`` in the reference; SGD with learning rate 1, so the weight
change is minus the gradient. The loss is summed per micro-step, divided by the window's
global token count and multiplied by the world size (FSDP averages gradients over
processes). Cases:

- ``jsd``: off-policy window, fused generalized JSD (``chunked_jsd_loss_sum``), untied heads;
- ``jsd_tied``: the same with tied embeddings (the head is the embedding matrix);
- ``jsd_nosync``: ``jsd`` with the micro-steps before the last under ``no_sync`` (gradients
  accumulated unsharded, reduce-scattered once), as the HF trainer runs FSDP2;
- ``jsd_onpolicy``: greedy rollouts from the student under ``generation_weights`` (they must
  equal the reference's), then the fused JSD on them;
- ``hybrid_uld``: off-policy, cross-vocabulary hybrid ULD (``uld_loss_sum``) with a synthetic
  alignment (one student token to one or two teacher tokens, two to one), teacher vocabulary
  and width different from the student's.

Counted on every case: the FSDP all-gathers of one micro-step with the loss chunked in 2
rows and in 1024 rows (equal when the heads are gathered once, not per chunk), and the
all-gathers during the window's ``generate`` call (one per FSDP group, not per token).

Part 2, memory (``--device cuda`` only, bfloat16, ~0.5B student and ~1.5B teacher, vocabulary
151,936): peak GPU memory per process of one on-policy GOLD window, FSDP2 over the GPUs
against one GPU holding everything (AdamW in both).

It drives the same stages as ``GoldTrainer`` (``axolotl_gold.scoring.loss``,
``axolotl_gold.models.fsdp2``) from a plain loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_TEACHER = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the same model shapes as the ZeRO-3 check: small for the gradient check, 0.5B / 1.5B for memory
from zero3_check import SMALL_STUDENT, SMALL_TEACHER  # noqa: E402
from zero3_check import STUDENT as MEM_STUDENT  # noqa: E402
from zero3_check import TEACHER as MEM_TEACHER  # noqa: E402
from fsdp2_inputs import make_objective, make_rows, slices, to_device  # noqa: E402

CASES = ("jsd", "jsd_tied", "jsd_onpolicy", "jsd_nosync", "hybrid_uld")


@contextlib.contextmanager
def no_sync(model):
    """Accelerate's ``no_sync`` under FSDP2."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------- models
def build(arch: dict, vocab: int, dtype, seed: int, device="cpu", tie: bool = False, meta: bool = False):
    """A Llama with the given shape, random weights from ``seed`` (``meta``: no weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=tie,
                      pad_token_id=vocab - 3, eos_token_id=vocab - 1, bos_token_id=None, **arch)
    if meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).to(dtype)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = vocab - 1
    model.generation_config.pad_token_id = vocab - 3
    return model


def shard_student(model, mesh, mp_policy=None):
    """What Accelerate's FSDP2 preparation does with ``transformer_based_wrap``: the decoder
    layers, then the root (``reshard_after_forward`` left to FSDP: True for the layers)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def gather_name() -> str:
    """The ``torch.distributed`` function FSDP2's all-gather calls in this torch."""
    import torch.distributed as dist

    return "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class GatherCounter:
    """Counts FSDP2's all-gathers (``dist.all_gather_single`` from torch 2.13, before it
    ``dist.all_gather_into_tensor``) while enabled."""

    def __init__(self):
        import torch.distributed as dist

        self.count, self.enabled = 0, False
        name = gather_name()
        self._orig = getattr(dist, name)

        def counted(*args, **kwargs):
            if self.enabled:
                self.count += 1
            return self._orig(*args, **kwargs)

        setattr(dist, name, counted)

    @contextlib.contextmanager
    def counting(self):
        start, self.enabled = self.count, True
        try:
            yield
        finally:
            self.enabled = False
            self.last = self.count - start


# ---------------------------------------------------------------- one window
def run_window(prepared, student, teacher, world, objective, device, backward, heads, no_sync=None):
    """``no_sync(model)``: a context for every micro-step but the last (what the HF trainer
    does under FSDP2 through ``accelerator.no_sync``: ``set_requires_gradient_sync(False)``,
    unsharded gradients accumulated locally, one reduce-scatter at the window's end)."""
    import torch
    import torch.distributed as dist

    from axolotl_gold.scoring.loss import loss_sum

    total = torch.tensor(float(prepared.local_tokens), device=device, dtype=torch.float32)
    if world > 1:
        dist.all_reduce(total)
    last = len(prepared.micro_batches) - 1
    for i, micro in enumerate(prepared.micro_batches):
        batch = to_device(micro, device)
        sync = no_sync(student) if no_sync is not None and i < last else contextlib.nullcontext()
        with sync, heads():  # across forward, loss and backward
            summed, _ = loss_sum(student, teacher, batch, objective, fused=True)
            backward(summed / total * world)  # FSDP averages gradients over processes


def prepare(rows_slices, engine, pad, objective, lmbda):
    """The package's window preparation (its home and signature moved during the layout
    refactor: both are accepted)."""
    import inspect

    try:
        from axolotl_gold.trainer.window import prepare_window
    except ImportError:
        from axolotl_gold.scoring.loss import prepare_window
    kwargs = dict(step=0, seed=0, rank=0, pad_id=pad, student_engine=engine, objective=objective)
    if "draws" in inspect.signature(prepare_window).parameters:
        kwargs["draws"] = [lmbda >= 1.0] * len(rows_slices)
    else:
        kwargs["lmbda"] = lmbda
    return prepare_window(rows_slices, **kwargs)


def equality(case: str, args, rank: int, world: int, device, counter: GatherCounter) -> dict | None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from axolotl_gold.models.fsdp2 import full_state_dict, gathered_heads, generation_weights, shard_teacher
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine

    on_policy = case == "jsd_onpolicy"
    tie = case == "jsd_tied"
    t_vocab = args.teacher_vocab if case == "hybrid_uld" else args.vocab
    pad, eos = args.vocab - 3, args.vocab - 1
    sampling = SamplingSettings(max_new_tokens=args.completion, temperature=0.0)
    objective = make_objective(case, args, chunk=args.chunk)
    per_rank = args.micro * args.accum
    rows = make_rows(args, per_rank * world, with_completions=not on_policy)
    mine = rows[rank * per_rank: (rank + 1) * per_rank]
    mesh = init_device_mesh(device.type, (world,))

    # ---- FSDP2 over all processes: built on the CPU, fully_shard moves the shards to the device
    student = shard_student(build(args.student, args.vocab, args.torch_dtype, seed=1, tie=tie), mesh)
    # the teacher's weights on rank 0 only, meta elsewhere: shard_teacher broadcasts them
    teacher = build(args.teacher, t_vocab, args.torch_dtype, seed=2, meta=rank != 0)
    teacher = shard_teacher(teacher, mesh)
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    engine = HFGenerateEngine(lambda: student, sampling, pad, {eos})
    heads = lambda: gathered_heads(student, teacher)  # noqa: E731
    from axolotl_gold.scoring.forward import bypassable_head

    fused_heads = [bypassable_head(student) is not None, bypassable_head(teacher) is not None]

    with counter.counting(), generation_weights(student):
        prepared = prepare(slices(mine, args.micro), engine, pad, objective, 1.0 if on_policy else 0.0)
    generation_gathers = counter.last if on_policy else None

    # all-gathers of one micro-step, the loss in chunks of 2 rows vs 1024 (no step in between)
    gathers = {}
    batch = to_device(prepared.micro_batches[0], device)
    from axolotl_gold.scoring.loss import loss_sum

    for chunk in (2, 1024):
        probe = make_objective(case, args, chunk=chunk)
        with counter.counting():
            with heads():
                summed, _ = loss_sum(student, teacher, batch, probe, fused=True)
                summed.backward()
        gathers[chunk] = counter.last
    optimizer.zero_grad(set_to_none=True)

    run_window(prepared, student, teacher, world, objective, device,
               lambda loss: loss.backward(), heads, no_sync=no_sync if case == "jsd_nosync" else None)
    optimizer.step()
    after = full_state_dict(student)  # rank 0: the full tensors, on the CPU
    completions = [r.completion_ids for s in prepared.window.slices for r in s]
    gathered = [None] * world
    dist.all_gather_object(gathered, completions)

    # ---- one process, no FSDP, the whole window as one micro-batch (rank 0)
    if rank != 0:
        return None
    ref_student = build(args.student, args.vocab, args.torch_dtype, seed=1, device=device, tie=tie)
    ref_teacher = build(args.teacher, t_vocab, args.torch_dtype, seed=2, device=device).requires_grad_(False)
    before = {n: p.detach().clone().cpu() for n, p in ref_student.named_parameters()}
    ref_engine = HFGenerateEngine(lambda: ref_student, sampling, pad, {eos})
    ref_prepared = prepare(slices(rows, per_rank * world), ref_engine, pad, objective, 1.0 if on_policy else 0.0)
    run_window(ref_prepared, ref_student, ref_teacher, 1, objective, device,
               lambda loss: loss.backward(), contextlib.nullcontext)
    ref_completions = [r.completion_ids for s in ref_prepared.window.slices for r in s]
    ref_delta = {n: -p.grad.detach().cpu() for n, p in ref_student.named_parameters()}
    fsdp_delta = {n: after[n].cpu() - before[n] for n in before}
    norm = sum(float(d.pow(2).sum()) for d in ref_delta.values()) ** 0.5
    diff = sum(float((fsdp_delta[n] - ref_delta[n]).pow(2).sum()) for n in ref_delta) ** 0.5
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    head_norm = float(ref_delta[head].norm())
    head_diff = float((fsdp_delta[head] - ref_delta[head]).norm())
    return {
        "case": case,
        "fused_heads": fused_heads,
        "relative_l2": diff / norm,
        "head_relative_l2": head_diff / head_norm,
        "grad_norm": norm,
        "head_grad_norm": head_norm,
        "same_rollouts": ref_completions == [c for part in gathered for c in part] if on_policy else None,
        "scored_units": ref_prepared.local_tokens,
        "gathers_per_micro_step_chunk2": gathers[2],
        "gathers_per_micro_step_chunk1024": gathers[1024],
        "gathers_during_generation": generation_gathers,
        "engine_calls": engine.calls,
    }


# ---------------------------------------------------------------- memory (GPU)
def memory(args, rank, world, device, fsdp: bool):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from axolotl_gold.models.fsdp2 import gathered_heads, generation_weights, shard_teacher
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
    from axolotl_gold.scoring.objectives import JsdObjective

    vocab = 151936
    pad, eos = vocab - 3, vocab - 1
    sampling = SamplingSettings(max_new_tokens=args.mem_completion, temperature=0.9, top_p=0.95)
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=1024)
    mem_args = argparse.Namespace(vocab=vocab, prompt=args.mem_prompt, completion=2)
    rows = make_rows(mem_args, args.mem_micro * args.mem_accum, with_completions=False)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if fsdp:
        mesh = init_device_mesh("cuda", (world,))
        student = shard_student(build(MEM_STUDENT, vocab, torch.bfloat16, seed=1), mesh)
        teacher = shard_teacher(build(MEM_TEACHER, vocab, torch.bfloat16, seed=2, meta=rank != 0), mesh)
        heads = lambda: gathered_heads(student, teacher)  # noqa: E731
        gen_ctx = lambda: generation_weights(student)  # noqa: E731
    else:
        student = build(MEM_STUDENT, vocab, torch.bfloat16, seed=1, device=device)
        teacher = build(MEM_TEACHER, vocab, torch.bfloat16, seed=2, device=device).requires_grad_(False)
        heads = gen_ctx = contextlib.nullcontext
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    engine = HFGenerateEngine(lambda: student, sampling, pad, {eos}, min_new_tokens=args.mem_completion)
    with gen_ctx():
        prepared = prepare(slices(rows, args.mem_micro), engine, pad, objective, 1.0)
    run_window(prepared, student, teacher, world if fsdp else 1, objective, device,
               lambda loss: loss.backward(), heads)
    optimizer.step()
    torch.cuda.synchronize()
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": time.perf_counter() - start,
            "tokens": prepared.local_tokens}


# ---------------------------------------------------------------- main
def main(argv=None):
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available (NCCL), else cpu (gloo)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--size", choices=("tiny", "small"), default=None,
                    help="model shapes of part 1 (default: tiny on the CPU, small on GPUs)")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--teacher-vocab", type=int, default=None)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--completion", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=8, help="loss chunk size of part 1")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="part 1's dtype (float64: the rounding floor of the comparison drops to ~1e-12)")
    ap.add_argument("--mem-micro", type=int, default=4)
    ap.add_argument("--mem-accum", type=int, default=2)
    ap.add_argument("--mem-prompt", type=int, default=256)
    ap.add_argument("--mem-completion", type=int, default=256)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", default=None, help="write the report here (rank 0)")
    args = ap.parse_args(argv)

    cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device, args.skip_memory = torch.device("cpu"), True
    size = args.size or ("small" if cuda else "tiny")
    args.student, args.teacher = (SMALL_STUDENT, SMALL_TEACHER) if size == "small" else (TINY_STUDENT, TINY_TEACHER)
    args.vocab = args.vocab or (32000 if size == "small" else 256)
    args.teacher_vocab = args.teacher_vocab or args.vocab + 64
    args.torch_dtype = getattr(torch, args.dtype)
    counter = GatherCounter()

    report = {"world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "backend": dist.get_backend(), "torch": torch.__version__, "size": size, "dtype": args.dtype,
              "window": f"{world} x ({args.micro}, {args.accum}) vs 1 x ({args.micro * args.accum * world}, 1)",
              "cases": {}}
    for case in [c for c in args.cases.split(",") if c]:
        start = time.perf_counter()
        result = equality(case, args, rank, world, device, counter)
        if rank == 0:
            result["seconds"] = round(time.perf_counter() - start, 2)
            report["cases"][case] = result
            print(f"{case}:", json.dumps(result), flush=True)
        dist.barrier()
    if not args.skip_memory:
        torch.cuda.empty_cache()
        report["memory_fsdp2"] = memory(args, rank, world, device, fsdp=True)
        torch.cuda.empty_cache()
        dist.barrier()
        if rank == 0:  # everything on one GPU, for comparison
            report["memory_single_gpu"] = memory(args, rank, 1, device, fsdp=False)
        dist.barrier()
    if rank == 0:
        print(json.dumps(report, indent=2))
        print(f"\nFSDP2 {report['window']}, {report['backend']} on {report['device']}, torch {report['torch']}, "
              f"{args.dtype}")
        print("\n| case | weight change vs one process, rel. L2 | head only, rel. L2 | greedy rollouts equal "
              "| all-gathers per micro-step, loss chunk 2 vs 1024 | all-gathers in generate |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, c in report["cases"].items():
            print(f"| {name} | {c['relative_l2']:.2e} | {c['head_relative_l2']:.2e} | "
                  f"{'-' if c['same_rollouts'] is None else c['same_rollouts']} | "
                  f"{c['gathers_per_micro_step_chunk2']} vs {c['gathers_per_micro_step_chunk1024']} | "
                  f"{'-' if c['gathers_during_generation'] is None else c['gathers_during_generation']} |")
        if "memory_fsdp2" in report:
            f, s = report["memory_fsdp2"], report["memory_single_gpu"]
            print(f"\n| peak GiB per GPU, FSDP2 x{world} vs one GPU | {f['peak_gib']:.1f} vs {s['peak_gib']:.1f} "
                  f"({f['peak_gib'] / s['peak_gib']:.2f}x) |")
            print(f"| window seconds, FSDP2 vs one GPU | {f['seconds']:.1f} vs {s['seconds']:.1f} |")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
