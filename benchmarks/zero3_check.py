"""GOLD under DeepSpeed ZeRO-3 on several GPUs: gradients against one GPU, and memory.

Run with torchrun on a machine with 2 GPUs (NCCL)::

    torchrun --nproc_per_node 2 benchmarks/zero3_check.py

(without GPUs it runs part 1 on the CPU over gloo, a smoke test).

Part 1, correctness (float32, a small Qwen2 pair, vocabulary 32,000): one GOLD
optimizer step under ZeRO-3 (student trained, teacher partitioned in an inference
engine, the student's weights gathered for the window's greedy rollouts, both
output heads gathered across each micro-step for the fused loss) against the same
step on one GPU without DeepSpeed. SGD with learning rate 1, so the weight change
is minus the gradient. Rollouts are greedy: both runs must sample the same tokens.

Part 2, memory (bfloat16, ~0.5B student and ~1.5B teacher, vocabulary 151,936):
peak GPU memory per process of one on-policy GOLD step, ZeRO-3 over the GPUs
against one GPU holding everything (AdamW in both).

It drives the same stages as ``GoldTrainer`` (``axolotl_gold.scoring.loss``, ``zero3``)
from a plain loop, because Axolotl is not installed on the GPU machine; the
``axolotl train`` path under ZeRO-3 is tested on the CPU (``tests/test_e2e_train.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL_STUDENT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 1024}
SMALL_TEACHER = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "intermediate_size": 2048}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_setup import STUDENT, TEACHER  # noqa: E402,F401  (bench_vs_reference's shapes)


def ds_config(micro: int, accum: int, world: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e4,
        },
    }


def build(arch: dict, vocab: int, dtype, seed: int, device="cpu", tied: bool = False):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=tied,
                      use_sliding_window=False, pad_token_id=vocab - 3, eos_token_id=vocab - 1,
                      bos_token_id=None, **arch)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = vocab - 1
    model.generation_config.pad_token_id = vocab - 3
    return model


def window_slices(args, rank_rows):
    from axolotl_gold.data.batching import Rollout

    return [
        [Rollout(prompt_ids=list(p), completion_ids=[]) for p in rank_rows[i : i + args.micro]]
        for i in range(0, len(rank_rows), args.micro)
    ]


def prompts(args, count: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(args.prompt // 2, args.prompt + 1, (count,), generator=g)
    return [torch.randint(0, args.vocab - 3, (int(n),), generator=g).tolist() for n in lengths]


def correctness(args, rank, world, device):
    import deepspeed
    import torch
    import torch.distributed as dist

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine
    from axolotl_gold.scoring.forward import bypassable_head
    from axolotl_gold.scoring.objectives import JsdObjective
    from axolotl_gold.models.zero3 import gathered_heads, generation_weights, inference_engine

    vocab, pad, eos = args.vocab, args.vocab - 3, args.vocab - 1
    sampling = SamplingSettings(max_new_tokens=args.completion, temperature=0.0)
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=1024)
    rows = prompts(args, args.micro * args.accum * world)
    mine = rows[rank * args.micro * args.accum : (rank + 1) * args.micro * args.accum]

    # ---- ZeRO-3 over all processes
    cfg = ds_config(args.micro, args.accum, world, bf16=False)
    # built on the CPU like the reference (same RNG, same weights); the engines partition them
    student = build(SMALL_STUDENT, vocab, torch.float32, seed=1, tied=args.tied)
    teacher = build(SMALL_TEACHER, vocab, torch.float32, seed=2, tied=args.tied).requires_grad_(False)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=1.0), config=cfg)
    teacher_engine = inference_engine(teacher, cfg, world)
    # as the engine factory builds it: no lockstep (the weights are gathered for the call,
    # DeepSpeed's hooks off); the static engine's graphs on a GPU, eager on the CPU
    cls = StaticCacheEngine if args.engine == "static" else HFGenerateEngine
    rollouts = cls(lambda: engine.module, sampling, pad, {eos}, generate_kwargs={"synced_gpus": False})
    heads = lambda: gathered_heads(bypassable_head(engine), bypassable_head(teacher_engine))  # noqa: E731

    def backward(loss):
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # DeepSpeed counts micro-steps: the optimizer steps at the boundary

    with generation_weights(engine):
        prepared = window_prepare(args, mine, rollouts, pad, objective)
    run_window(prepared, engine, teacher_engine, world, objective, device, backward, heads)
    completions = [r.completion_ids for s in prepared.window.slices for r in s]
    after = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            after[name] = param.detach().clone().cpu()
    gathered = [None] * world
    dist.all_gather_object(gathered, completions)

    # ---- one GPU, no DeepSpeed, the whole window (rank 0)
    if rank != 0:
        return None
    ref_student = build(SMALL_STUDENT, vocab, torch.float32, seed=1, device=device, tied=args.tied)
    ref_teacher = build(SMALL_TEACHER, vocab, torch.float32, seed=2, device=device, tied=args.tied).requires_grad_(False)
    before = {n: p.detach().clone().cpu() for n, p in ref_student.named_parameters()}
    ref_engine = HFGenerateEngine(lambda: ref_student, sampling, pad, {eos})
    ref_prepared = window_prepare(args, rows, ref_engine, pad, objective)
    run_window(ref_prepared, ref_student, ref_teacher, 1, objective, device,
               lambda loss: loss.backward(), contextlib.nullcontext)
    ref_completions = [r.completion_ids for s in ref_prepared.window.slices for r in s]
    same_rollouts = ref_completions == [c for part in gathered for c in part]
    ref_delta = {n: -p.grad.detach().cpu() for n, p in ref_student.named_parameters()}
    z3_delta = {n: after[n] - before[n] for n in before}
    norm = sum(float(d.pow(2).sum()) for d in ref_delta.values()) ** 0.5
    diff = sum(float((z3_delta[n] - ref_delta[n]).pow(2).sum()) for n in ref_delta) ** 0.5
    return {"same_rollouts": same_rollouts, "relative_l2": diff / norm, "grad_norm": norm,
            "engine_calls": rollouts.calls, "scored_tokens_per_rank": prepared.local_tokens,
            "engine": type(rollouts).__name__, "graphs_captured": getattr(rollouts, "graphs_captured", 0)}


def window_prepare(args, rows, engine, pad, objective):
    from axolotl_gold.trainer.window import prepare_window

    slices = window_slices(args, rows)
    return prepare_window(slices, draws=[True] * len(slices), step=0, seed=0, rank=0, pad_id=pad,
                          student_engine=engine, objective=objective)


def run_window(prepared, student_call, teacher, world, objective, device, backward, heads):
    import torch
    import torch.distributed as dist

    from axolotl_gold.data.transfer import to_device
    from axolotl_gold.scoring.loss import loss_sum

    total = torch.tensor(prepared.local_tokens, device=device, dtype=torch.float32)
    if world > 1:
        dist.all_reduce(total)
    for micro in prepared.micro_batches:
        batch = to_device(micro, device)
        with heads():
            summed, _ = loss_sum(student_call, teacher, batch, objective, fused=True)
            backward(summed / total * world)  # DeepSpeed averages gradients over processes


def memory(args, rank, world, device, zero3: bool):
    import deepspeed
    import torch

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine
    from axolotl_gold.scoring.forward import bypassable_head
    from axolotl_gold.scoring.objectives import JsdObjective
    from axolotl_gold.models.zero3 import gathered_heads, generation_weights, inference_engine

    vocab, pad, eos = 151936, 151933, 151935
    sampling = SamplingSettings(max_new_tokens=args.mem_completion, temperature=0.9, top_p=0.95)
    objective = JsdObjective(beta=0.5, temperature=1.0, chunk_size=1024)
    mem_args = argparse.Namespace(micro=args.mem_micro, vocab=vocab, prompt=args.mem_prompt)
    rows = prompts(mem_args, args.mem_micro * args.mem_accum)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if zero3:
        cfg = ds_config(args.mem_micro, args.mem_accum, world, bf16=True)
        # built on the CPU; the engines partition them onto the GPUs
        student = build(STUDENT, vocab, torch.bfloat16, seed=1)
        teacher = build(TEACHER, vocab, torch.bfloat16, seed=2).requires_grad_(False)
        engine, *_ = deepspeed.initialize(
            model=student, optimizer=torch.optim.AdamW(student.parameters(), lr=1e-6), config=cfg)
        teacher_model = inference_engine(teacher, cfg, world)
        call = engine
        heads = lambda: gathered_heads(bypassable_head(engine), bypassable_head(teacher_model))  # noqa: E731

        def backward(loss):
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()

        gen_ctx = lambda: generation_weights(engine)  # noqa: E731
        get = lambda: engine.module  # noqa: E731
        step = lambda: None  # noqa: E731
    else:
        student = build(STUDENT, vocab, torch.bfloat16, seed=1, device=device)
        teacher_model = build(TEACHER, vocab, torch.bfloat16, seed=2, device=device).requires_grad_(False)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
        call, heads, backward, get = student, contextlib.nullcontext, lambda loss: loss.backward(), lambda: student
        gen_ctx = contextlib.nullcontext
        step = optimizer.step
    rollouts = HFGenerateEngine(get, sampling, pad, {eos}, min_new_tokens=args.mem_completion)
    mem_args.micro = args.mem_micro
    with gen_ctx():
        prepared = window_prepare(mem_args, rows, rollouts, pad, objective)
    run_window(prepared, call, teacher_model, world if zero3 else 1, objective, device, backward, heads)
    step()
    torch.cuda.synchronize()
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": time.perf_counter() - start,
            "tokens": prepared.local_tokens}


def main():
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--completion", type=int, default=16)
    ap.add_argument("--mem-micro", type=int, default=4)
    ap.add_argument("--mem-accum", type=int, default=2)
    ap.add_argument("--mem-prompt", type=int, default=256)
    ap.add_argument("--mem-completion", type=int, default=256)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--engine", choices=("hf", "static"), default="hf",
                    help="part 1's rollout engine on the gathered student (static: CUDA graphs on a GPU)")
    ap.add_argument("--tied", action="store_true",
                    help="part 1 with tied embeddings (the output head is the embedding, which the forward's hooks release)")
    args = ap.parse_args()

    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed("nccl" if cuda else "gloo")  # gloo: a CPU smoke test
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device, args.skip_memory = torch.device("cpu"), True
    report = {"world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    report["correctness"] = correctness(args, rank, world, device)
    if rank == 0:
        print("correctness:", json.dumps(report["correctness"]), flush=True)
    dist.barrier()
    if not args.skip_memory:
        torch.cuda.empty_cache()
        report["memory_zero3"] = memory(args, rank, world, device, zero3=True)
        torch.cuda.empty_cache()
        dist.barrier()
        if rank == 0:  # everything on one GPU, for comparison
            report["memory_single_gpu"] = memory(args, rank, 1, device, zero3=False)
        dist.barrier()
    if rank == 0:
        print(json.dumps(report, indent=2))
        c = report["correctness"]
        print("\n| check | value |\n| --- | --- |")
        print(f"| greedy rollouts equal to one GPU | {c['same_rollouts']} |")
        print(f"| weight change vs one GPU, relative L2 | {c['relative_l2']:.2e} |")
        print(f"| generation calls per window | {c['engine_calls']} |")
        print(f"| rollout engine (CUDA graphs captured) | {c['engine']} ({c['graphs_captured']}) |")
        if "memory_zero3" in report:
            z, s = report["memory_zero3"], report["memory_single_gpu"]
            print(f"| peak GiB per GPU, ZeRO-3 x{world} vs one GPU | {z['peak_gib']:.1f} vs {s['peak_gib']:.1f} "
                  f"({z['peak_gib'] / s['peak_gib']:.2f}x) |")
            print(f"| step seconds, ZeRO-3 vs one GPU | {z['seconds']:.1f} vs {s['seconds']:.1f} |")


if __name__ == "__main__":
    main()
