"""Peak memory per GPU of a GOLD step, from parameter, gradient, optimizer and activation
sizes: one GPU vs FSDP2 vs DeepSpeed ZeRO-3.

    python benchmarks/memory_model.py              # the tables (no torch needed)

A GOLD step has two phases that never overlap, so the peak is the larger of:

- rollouts: the student's training state (sharded or not) + the teacher as held + the
  student's full bf16 weights (FSDP2's ``generation_weights`` / ZeRO-3's
  ``unwrap_model_for_generation`` gather them once per window) + the KV cache of the
  window's rollouts;
- a micro-step: training state + teacher as held + what is gathered for the step (the
  student's root group and one or two decoder layers, the teacher's output head kept
  gathered by ``gathered_heads`` across the micro-step, a teacher layer and its prefetch)
  + the student's saved activations (no gradient checkpointing) + the fused loss's chunk
  buffers.

Assumptions, stated once (bytes per parameter):

- "bf16" (what Axolotl's ``bf16: true`` does on one GPU): bf16 weights, bf16 grads and
  bf16 AdamW moments (torch's AdamW keeps its states in the parameter's dtype): 8 B.
- "mixed": bf16 compute over fp32 master weights, fp32 grads, fp32 AdamW moments: 16 B
  (FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16)`` holds fp32 shards; ZeRO-3 with
  ``bf16`` holds bf16 + fp32 master + fp32 moments + fp32 gradient partitions: 18 B).
  On one GPU, autocast also caches a bf16 copy of every weight during the forward: +2 B.
- the teacher in bf16 (2 B), no gradients, no optimizer.
- activations saved for backward per token and decoder layer, in bf16:
  ``10 h + 4 kv + 4 i`` elements (norm inputs and outputs, q/k/v/o, attention output with
  SDPA or flash attention, the SwiGLU gate, up, activation and product), times layers and
  the micro-batch's tokens (prompt + completion).
- the fused JSD: 6.9 bytes per (token x vocab) element of a chunk, from the measured 2.0 GiB
  of ``benchmarks/bench_jsd_loss.py`` at 2,048 tokens x 151,936 (H100, Triton kernel).
- KV cache of the rollouts: 2 (k, v) x layers x kv x window rows x (prompt + completion), bf16.

It ignores the CUDA context (~0.5 GiB), allocator fragmentation and CUDA-graph pools: the
check against the 1-GPU measurement below shows how much that is.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attn = h * self.q + 2 * h * self.kv + self.q * h + (self.q + 2 * self.kv)  # qkv bias (Qwen2)
        return attn + 3 * h * self.intermediate + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """What FSDP2's root group holds: embeddings, the head when untied, final norm."""
        return self.embed_params * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def activation_bytes(self, tokens: int) -> int:
        per_token_layer = 10 * self.hidden + 4 * self.kv + 4 * self.intermediate
        return 2 * per_token_layer * self.layers * tokens


# Qwen3 shapes (the 8B and 1.7B of the table); Qwen2.5 shapes of benchmarks/bench_cli.py
QWEN3_8B = Shape("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, tied=False)
QWEN3_1_7B = Shape("Qwen3-1.7B", 2048, 28, 16, 8, 128, 6144, 151936, tied=True)
QWEN3_14B = Shape("Qwen3-14B", 5120, 40, 40, 8, 128, 17408, 151936, tied=False)
BENCH_STUDENT = Shape("0.5B (Qwen2.5-0.5B shape)", 896, 24, 14, 2, 64, 4864, 151936, tied=True)
BENCH_TEACHER = Shape("1.5B (Qwen2.5-1.5B shape)", 1536, 28, 12, 2, 128, 8960, 151936, tied=True)


@dataclass(frozen=True)
class Workload:
    micro_batch: int = 4
    accumulation: int = 4
    prompt: int = 256
    completion: int = 768
    chunk: int = 512  # gold_loss_chunk_size (the plugin's default, config.schema.LOSS_CHUNK_SIZE)

    @property
    def tokens(self) -> int:
        return self.micro_batch * (self.prompt + self.completion)


LOSS_BYTES_PER_ELEMENT = 2.0 * GIB / (2048 * 151936)  # measured: 2.0 GiB at 2048 x 151,936


def peak(student: Shape, teacher: Shape, work: Workload, setup: str, gpus: int) -> dict:
    """Bytes per GPU by component, and the peak of the two phases."""
    n = gpus if setup in ("fsdp2", "zero3") else 1
    s, t = student.params, teacher.params
    state_bytes = {"bf16": 8, "mixed": 16 + 2, "fsdp2": 16, "zero3": 18}[setup]
    parts = {"student state": state_bytes * s / n, "teacher": 2 * t / n}
    rows = work.micro_batch * work.accumulation
    kv = 2 * student.layers * student.kv * rows * (work.prompt + work.completion) * 2
    gathered_student = 2 * s if n > 1 else 0
    rollout = parts["student state"] + parts["teacher"] + gathered_student + kv
    loss = LOSS_BYTES_PER_ELEMENT * min(work.chunk, work.micro_batch * work.completion) * max(
        student.vocab, teacher.vocab
    )
    act = student.activation_bytes(work.tokens)
    gathered = 0.0
    if setup == "fsdp2":
        # student root (bf16 params + their unsharded bf16 grads in the backward), two
        # student layers (current + prefetch, params and grads), the teacher's root group
        # (gathered_heads keeps it across the micro-step) and two teacher layers
        gathered = (2 + 2) * student.root_params + 2 * (2 + 2) * student.layer_params
        gathered += 2 * teacher.root_params + 2 * 2 * teacher.layer_params
    elif setup == "zero3":
        # the heads gathered for the fused loss, two layers of each model in flight
        gathered = (2 + 2) * student.embed_params + 2 * teacher.embed_params
        gathered += 2 * (2 + 2) * student.layer_params + 2 * 2 * teacher.layer_params
    step = parts["student state"] + parts["teacher"] + gathered + act + loss
    parts.update({"gathered (step)": gathered, "activations": act, "loss chunk": loss,
                  "gathered student (rollouts)": gathered_student, "KV cache": kv})
    return {"parts": parts, "rollout": rollout, "step": step, "peak": max(rollout, step)}


# bitsandbytes nf4 with double quantization: 4 bits per weight, an 8-bit absmax per 64
# weights and an fp32 scale per 256 absmaxes; embeddings, norms and lm_head stay bf16
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LORA_STATE_BYTES = 16  # fp32 adapter weights (peft's autocast_adapter_dtype), grads, AdamW moments


def lora_params(shape: Shape, rank: int) -> int:
    """LoRA A and B of every linear layer of the decoder (``lora_target_linear``)."""
    h, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return shape.layers * sum(rank * (a + b) for a, b in shapes)


def peak_lora_quantized_teacher(student: Shape, teacher: Shape, work: Workload, rank: int = 16) -> dict:
    """One GPU: a bf16 LoRA student (frozen base), an nf4 teacher, gradient checkpointing.

    Rollouts: weights + the window's KV cache (all rows at once) + the sampling buffers
    (float32 logits and probabilities, the top-p sort's values and int64 order, per row).
    Micro-step: weights + adapter state + one hidden state per layer per token (the
    checkpoints) + one layer's activations recomputed in the backward + the fused loss's
    chunk + the teacher's widest dequantized linear layer.
    """
    linear = teacher.layers * (teacher.layer_params - 2 * teacher.hidden)
    teacher_bytes = NF4_BYTES * linear + 2 * (teacher.params - linear)
    weights = 2 * student.params + teacher_bytes + LORA_STATE_BYTES * lora_params(student, rank)
    rows = work.micro_batch * work.accumulation
    kv = 2 * student.layers * student.kv * rows * (work.prompt + work.completion) * 2
    sampling = rows * student.vocab * (4 + 4 + 4 + 8)
    tokens = work.tokens
    checkpoints = 2 * student.hidden * student.layers * tokens
    one_layer = 2 * (10 * student.hidden + 4 * student.kv + 4 * student.intermediate) * tokens
    loss = LOSS_BYTES_PER_ELEMENT * min(work.chunk, work.micro_batch * work.completion) * student.vocab
    dequantized = 2 * teacher.hidden * teacher.intermediate
    rollout = weights + kv + sampling
    step = weights + checkpoints + one_layer + loss + dequantized
    parts = {"student weights": 2 * student.params, "teacher (nf4)": teacher_bytes,
             "adapter state": LORA_STATE_BYTES * lora_params(student, rank), "KV cache": kv,
             "sampling": sampling, "checkpoints": checkpoints, "one layer": one_layer, "loss chunk": loss}
    return {"parts": parts, "rollout": rollout, "step": step, "peak": max(rollout, step)}


def table(student: Shape, teacher: Shape, work: Workload, gpus: int, setups) -> str:
    head = ["setup", "student state", "teacher", "activations", "loss chunk", "gathered (step)",
            "gathered student (rollouts)", "micro-step", "rollouts", "peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, setup, n in setups:
        r = peak(student, teacher, work, setup, n)
        p = r["parts"]
        cells = [label] + [f"{p[k] / GIB:.1f}" for k in head[1:7]]
        cells += [f"{r['step'] / GIB:.1f}", f"{r['rollout'] / GIB:.1f}", f"**{r['peak'] / GIB:.1f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--measured-gib", type=float, default=16.3,
                    help="bench_cli's 1-GPU peak through axolotl train (H200, twelfth session, loss chunk 2048)")
    ap.add_argument("--measured-loop-gib", type=float, default=14.2,
                    help="bench_cli's 1-GPU peak of the plain loop (H200)")
    ap.add_argument("--measured-real-gib", type=float, default=28.6,
                    help="real_sizes.py's peak through axolotl train (H200, static engine)")
    args = ap.parse_args(argv)
    work = Workload()
    print(f"# GOLD peak memory per GPU (GiB): {QWEN3_8B.name} teacher ({QWEN3_8B.params / 1e9:.2f}B), "
          f"{QWEN3_1_7B.name} student ({QWEN3_1_7B.params / 1e9:.2f}B), micro batch {work.micro_batch} x "
          f"accumulation {work.accumulation}, {work.prompt} + {work.completion} tokens, AdamW, "
          "no gradient checkpointing\n")
    print(table(QWEN3_1_7B, QWEN3_8B, work, args.gpus, [
        ("one GPU, bf16 (8 B/param)", "bf16", 1),
        ("one GPU, fp32 master + AdamW (18 B/param)", "mixed", 1),
        (f"FSDP2, {args.gpus} GPUs (16 B/param sharded)", "fsdp2", args.gpus),
        (f"ZeRO-3, {args.gpus} GPUs (18 B/param sharded)", "zero3", args.gpus),
    ]))
    print(f"\n# Check: benchmarks/bench_cli.py on one GPU: {BENCH_STUDENT.name} student "
          f"({BENCH_STUDENT.params / 1e9:.3f}B), {BENCH_TEACHER.name} teacher "
          f"({BENCH_TEACHER.params / 1e9:.3f}B), bf16, same workload, loss chunk 2048 (as measured)\n")
    measured = Workload(chunk=2048)
    print(table(BENCH_STUDENT, BENCH_TEACHER, measured, 1, [("one GPU, bf16 (8 B/param)", "bf16", 1)]))
    predicted = peak(BENCH_STUDENT, BENCH_TEACHER, measured, "bf16", 1)["peak"] / GIB
    print(f"\npredicted {predicted:.1f} GiB; measured {args.measured_loop_gib} GiB (plain loop, "
          f"{predicted / args.measured_loop_gib:.2f}x) and {args.measured_gib} GiB (axolotl train, "
          f"{predicted / args.measured_gib:.2f}x) on an H200")
    long = Workload(micro_batch=1, accumulation=4, prompt=256, completion=4096)
    big = peak_lora_quantized_teacher(QWEN3_8B, QWEN3_14B, long)
    print(f"\n# One GPU, {QWEN3_14B.name} teacher in nf4, {QWEN3_8B.name} bf16 LoRA student (r 16), 1 x 4 "
          "rollouts of 256 + 4096 tokens, gradient checkpointing (benchmarks/real_sizes.py)\n")
    print("| part | GiB |\n| --- | ---: |")
    for name, value in big["parts"].items():
        print(f"| {name} | {value / GIB:.2f} |")
    print(f"| **rollouts / micro-step / peak** | {big['rollout'] / GIB:.1f} / {big['step'] / GIB:.1f} / "
          f"**{big['peak'] / GIB:.1f}** |")
    print(f"\nmeasured through axolotl train on an H200: {args.measured_real_gib} GiB "
          f"({big['peak'] / GIB / args.measured_real_gib:.2f}x)")


if __name__ == "__main__":
    main()
