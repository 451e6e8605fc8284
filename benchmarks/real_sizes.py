"""Real sizes on one GPU through `axolotl train`: a 14B-shaped teacher in 4-bit beside an
8B-shaped LoRA student, long completions, and the memory model's prediction beside the
measurement.

    python benchmarks/real_sizes.py [--completion 4096] [--json out.json]    # GPU, ~6 min
    source scripts/env.sh && .venv/bin/python benchmarks/real_sizes.py --tiny --device cpu

Models: Qwen3-shaped (`memory_model.QWEN3_14B`, `memory_model.QWEN3_8B`), random bf16
weights drawn on the device and saved once under --cache-dir (about 46 GB at full size),
with bench_cli's one-token-per-character tokenizer (vocabulary 151,936). The YAML: the
student as a bf16 LoRA (r 16, every linear layer) with gradient checkpointing, the teacher
through `teacher_model_init_kwargs: {quantization_config: {load_in_4bit: true, nf4}}`, lmbda
1 (every window sampled), micro batch 1 x accumulation 4 = 4 rollouts of --completion tokens
each (forced to full length by `rollout_plugins.FixedLengthRollouts`), the static engine.

Prints one table: tokens/s, generation / teacher / student seconds per step, the peak
memory the trainer logged (torch's max allocated over all steps), and the memory model's
prediction (`memory_model.peak_lora_quantized_teacher`) for the same workload.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cli  # noqa: E402
import memory_model as mm  # noqa: E402

TINY_TEACHER = mm.Shape("tiny teacher", 128, 2, 4, 2, 32, 256, 512, tied=False)
TINY_STUDENT = mm.Shape("tiny student", 64, 2, 4, 2, 16, 128, 512, tied=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test of the script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--completion", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--no-quantize", action="store_true", help="the teacher in bf16 instead of 4-bit")
    p.add_argument("--compile", action="store_true", help="gold_rollout_compile: true")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "gold_real_sizes"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def shapes(args) -> tuple[mm.Shape, mm.Shape]:
    return (TINY_STUDENT, TINY_TEACHER) if args.tiny else (mm.QWEN3_8B, mm.QWEN3_14B)


def build_model(shape: mm.Shape, out: Path, device: str) -> None:
    """A Qwen3 model of ``shape`` with random bf16 weights, saved with the benchmark tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    class _Ids:  # bench_cli.byte_tokenizer reads the special ids from a module like this
        special_ids = staticmethod(lambda vocab: (vocab - 3, vocab - 1))

    pad, eos = _Ids.special_ids(shape.vocab)
    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied, max_position_embeddings=40960,
        rope_theta=1e6, pad_token_id=pad, eos_token_id=eos, bos_token_id=None, use_sliding_window=False,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device != "cpu" else torch.float32)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training subprocess gets the whole GPU
    bench_cli.byte_tokenizer(shape.vocab, _Ids, str(out))


def write_config(args, models: Path, work: Path) -> Path:
    import yaml

    cuda = args.device.startswith("cuda")
    window = args.micro_batch * args.grad_accum
    with open(work / "prompts.jsonl", "w") as f:
        for row in range(window * (args.warmup + args.steps) * 2):
            text = "".join(chr(ord("a") + (row * 7 + i) % 26) for i in range(args.prompt))
            f.write(json.dumps({"messages": [{"role": "user", "content": text}]}) + "\n")
    teacher_kwargs = {} if args.no_quantize else {"quantization_config": {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16"}}
    cfg = {
        "base_model": str(models / "student"),
        "teacher_model": str(models / "teacher"),
        "teacher_model_init_kwargs": teacher_kwargs or None,
        "plugins": ["axolotl_gold.GoldPlugin", "rollout_plugins.FixedLengthRollouts"],
        "adapter": "lora", "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.0,
        "lora_target_linear": True,
        "lmbda": 1.0, "beta": 0.5, "temperature": 0.9, "top_p": 0.95, "top_k": 0, "loss_temperature": 0.9,
        "max_completion_length": args.completion, "num_generations": window,
        "gold_generation_engine": "static", "gold_rollout_compile": args.compile or None,
        "datasets": [{"path": str(work / "prompts.jsonl"), "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(work / "prepared"), "dataset_num_proc": 1, "val_set_size": 0,
        "sequence_len": args.prompt + args.completion, "sample_packing": False,
        "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": args.grad_accum,
        "max_steps": args.warmup + args.steps, "learning_rate": 1e-5, "lr_scheduler": "constant",
        "optimizer": "adamw_torch_fused" if cuda else "adamw_torch",
        "bf16": cuda, "fp16": False, "tf32": False, "attn_implementation": "sdpa",
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "output_dir": str(work / "out"), "save_strategy": "no", "logging_steps": 1,
        "seed": 0, "dataloader_num_workers": 0,
    }
    if not cuda:
        cfg.update(bench_cli.lora_kernels_off())
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path


def predicted(args) -> dict:
    student, teacher = shapes(args)
    work = mm.Workload(micro_batch=args.micro_batch, accumulation=args.grad_accum, prompt=args.prompt,
                       completion=args.completion)
    return mm.peak_lora_quantized_teacher(student, teacher, work, rank=args.lora_r)


def table(args, row: dict, model: dict) -> str:
    student, teacher = shapes(args)
    lines = [
        f"{teacher.name} teacher ({teacher.params / 1e9:.1f}B, {'bf16' if args.no_quantize else 'nf4'}), "
        f"{student.name} student ({student.params / 1e9:.1f}B, bf16 LoRA r {args.lora_r}), {args.micro_batch} x "
        f"{args.grad_accum} rollouts of {args.prompt} + {args.completion} tokens per step, gradient checkpointing, "
        f"static engine{' + torch.compile' if args.compile else ''}; mean of {args.steps} step(s) after {args.warmup} warm-up",
        "",
        "| tokens/s | generation s | teacher s | student s | step s | peak GiB (measured) | peak GiB (model: rollouts / step) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    gib = mm.GIB
    model_cell = f"{model['peak'] / gib:.1f} ({model['rollout'] / gib:.1f} / {model['step'] / gib:.1f})"
    if "error" in row:
        lines.append(f"| failed: {row['error']} | | | | | | {model_cell} |")
    else:
        lines.append(f"| {row['tokens_per_s']:.0f} | {row['generation_s']:.1f} | {row['teacher_s']:.1f} | "
                     f"{row['student_s']:.1f} | {row['step_s']:.1f} | {bench_cli.fmt(row.get('peak_gib'), '{:.1f}')} | "
                     f"{model_cell} |")
    lines += ["", "model parts (GiB): " + ", ".join(f"{k} {v / gib:.2f}" for k, v in model["parts"].items())]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    student, teacher = shapes(args)
    models = Path(args.cache_dir) / ("tiny" if args.tiny else "full")
    for name, shape in (("student", student), ("teacher", teacher)):
        if not (models / name / "config.json").exists():
            print(f"[real_sizes] building the {name} ({shape.params / 1e9:.2f}B) under {models / name}", flush=True)
            build_model(shape, models / name, args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gold_real_sizes_"))
    work.mkdir(parents=True, exist_ok=True)
    path = write_config(args, models, work)
    row = bench_cli.train(path, work, cuda=args.device.startswith("cuda"), min_new_tokens=args.completion,
                          warmup=args.warmup, steps=args.steps, timeout=args.timeout)
    model = predicted(args)
    print("\n" + table(args, row, model), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "measured": row, "model": model}, indent=1))
    if "error" in row:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
