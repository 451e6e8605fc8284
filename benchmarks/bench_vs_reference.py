"""One GOLD configuration trained by our step and by TRL's reference ``GOLDTrainer``.

Same random-weight Qwen2-shaped models (same seed, so the same weights), same prompts,
same sampling (temperature 0.9, top_p 0.95: the reference's defaults), every rollout
forced to exactly ``--completion`` tokens on both sides (EOS and pad, both stop tokens,
suppressed through ``min_new_tokens``), lmbda 1 (all on-policy), beta 0.5, bf16 weights, AdamW, no gradient
checkpointing on either side unless ``--gradient-checkpointing``.

Variants, each in its own subprocess so that memory readings and caches do not mix:
  ours-fast       our step (axolotl_gold.trainer.window.prepare_window, scoring.loss.loss_sum, JsdObjective with the
                  chunked fused loss) with StaticCacheEngine (static cache, CUDA-graph decode)
  ours-hf         the same step with HFGenerateEngine (plain model.generate)
  ours-hf-static  HFGenerateEngine with cache_implementation="static" (HF compiles the
                  decode step; slow to warm up, so not run unless named in --variants)
  reference       trl.experimental.gold.GOLDTrainer, use_vllm False

--ragged: no forced lengths; the models' generation_config lists a stop set sized for a
mean completion of ~40% of --completion (ragged.py), read by every side; our variants also
run forced (VARIANT-forced), and a second table gives the length distribution, generated
tokens per second and the time per generated token against the forced run.

Our side runs the axolotl-free stages that GoldTrainer calls, from a plain loop: one
``prepare_window`` per optimizer step, then per micro-batch ``loss_sum / window tokens``
and backward, then the optimizer step.

Timing: ``--warmup`` optimizer steps (compilation, allocator warm-up), then ``--steps``
timed ones; the table shows the mean of the timed steps. Generation time is the time in
the rollout engine (ours) or in the student's ``generate`` (reference); teacher time is
the teacher's forward passes, measured with a device sync before and after each; the
rest (student forward and backward, the loss, the optimizer) is "student + loss + optim".
Tokens/s counts the scored completion tokens of a step over the step's wall time.
Peak memory is ``torch.cuda.max_memory_allocated`` over the whole subprocess (weights,
optimizer state, warm-up included).

GPU (defaults, ~0.5B student, ~1.5B teacher, 256 + 768 tokens, micro batch 4 x 4):
  python benchmarks/bench_vs_reference.py
CPU smoke test:
  python benchmarks/bench_vs_reference.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the shared setup and our step, re-exported for the scripts that import them from here
from bench_ours import Ours, engine_kind, measured_stop_mass, run_ours, sampling_cost_ms  # noqa: E402,F401
from bench_setup import (  # noqa: E402,F401
    STUDENT, TEACHER, TINY_STUDENT, TINY_TEACHER, Timers, build_models, build_prompts, build_tokenizer,
    peak_memory, special_ids, stop_set, summarize,
)

DEFAULT_VARIANTS = ("ours-fast", "ours-hf", "reference")
ALL_VARIANTS = ("ours-fast", "ours-hf", "ours-hf-static", "reference")



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models and lengths, for a CPU smoke test")
    p.add_argument("--compile", action="store_true",
                   help="ours: the static engine's decode step through torch.compile (gold_rollout_compile)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="from " + ",".join(ALL_VARIANTS))
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--only-reference", action="store_true")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (256; tiny 16)")
    p.add_argument("--completion", type=int, default=None, help="completion tokens (768; tiny 12)")
    p.add_argument("--micro-batch", type=int, default=None, help="4; tiny 2")
    p.add_argument("--grad-accum", type=int, default=None, help="4; tiny 2")
    p.add_argument("--vocab", type=int, default=None, help="151936; tiny 512")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--ragged", action="store_true",
                   help="lengths from a stop set (ragged.py: mean ~40%% of --completion) instead of forced; "
                        "our variants also run forced (VARIANT-forced) for the cost of stopped rows")
    p.add_argument("--generation-rows", type=int, default=None,
                   help="rows our engine decodes at once (`gold_generation_rows`; default: as many as fit); "
                        "fewer than a window's rollouts: stopped rows' slots are refilled")
    from axolotl_gold.config.schema import LOSS_CHUNK_SIZE

    p.add_argument("--chunk-size", type=int, default=LOSS_CHUNK_SIZE,
                   help="tokens per chunk of our fused loss (the plugin's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="first check StaticCacheEngine greedy == model.generate on a tiny fp32 model")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds per variant subprocess")
    p.add_argument("--json-dir", default=None, help="also write each variant's result here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tiny = a.tiny
    for name, big, small in (("prompt", 256, 16), ("completion", 768, 12), ("micro_batch", 4, 2),
                             ("grad_accum", 4, 2), ("vocab", 151936, 512)):
        if getattr(a, name) is None:
            setattr(a, name, small if tiny else big)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


# ---------------------------------------------------------------- the reference


def run_reference(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    student, teacher = build_models(args, device, dtype)
    tokenizer = build_tokenizer(args.vocab)
    pad, eos = special_ids(args.vocab)
    assert tokenizer.pad_token_id == pad and tokenizer.eos_token_id == eos

    window = args.micro_batch * args.grad_accum
    total_steps = args.warmup + args.steps
    prompts = build_prompts(args, window * total_steps)
    # pre-tokenized rows: prompt plus one dataset completion token (never used: lmbda = 1); the
    # collator reads the boundary from completion_mask but wants the prompt text present
    rows = [{"prompt": tokenizer.decode(p), "input_ids": p + [p[0]], "attention_mask": [1] * (len(p) + 1),
             "completion_mask": [0] * len(p) + [1]} for p in prompts]
    dataset = Dataset.from_list(rows)

    timers = Timers(device)
    timers.hook_teacher(teacher)
    timers.wrap_generate(student)
    records = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            timers.reset()
            timers.sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            timers.sync()
            elapsed = time.perf_counter() - self.start
            records.append({"step": elapsed, "generation": timers.generation, "teacher": timers.teacher,
                            "tokens": timers.tokens, "lengths": timers.lengths})
            print(f"[reference] step {len(records) - 1}: {elapsed:.2f} s, generation {timers.generation:.2f} s, "
                  f"teacher {timers.teacher:.2f} s, tokens {timers.tokens}", flush=True)

    out_dir = tempfile.mkdtemp(prefix="gold_ref_")
    config = GOLDConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=total_steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        lmbda=1.0,
        beta=0.5,
        temperature=0.9,
        top_p=0.95,
        top_k=0,
        max_completion_length=args.completion,
        max_length=args.prompt + args.completion,
        bf16=cuda,
        use_cpu=not cuda,
        use_vllm=False,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
        log_completions=False,
    )
    trainer = GOLDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[StepTimer()],
    )
    if not args.ragged:  # the same fixed-length rollouts as ours: EOS suppressed until the last token
        trainer.generation_config.min_new_tokens = args.completion

    original_loss = trainer.compute_loss

    def counted_loss(model, inputs, *a, **k):
        scored = (inputs["labels"][:, 1:] != -100).sum(1)
        timers.tokens += int(scored.sum())
        timers.lengths += scored.tolist()
        return original_loss(model, inputs, *a, **k)

    trainer.compute_loss = counted_loss
    trainer.train()
    return summarize("reference", records, args.warmup, device, {"engine": "hf"})


# ---------------------------------------------------------------- checks and driver


def check_fast_engine(device: str) -> str:
    """StaticCacheEngine greedy vs model.generate greedy on a tiny fp32 random model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.static import StaticCacheEngine
    from axolotl_gold.rollouts.engines.hf import HFGenerateEngine

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = Qwen2ForCausalLM(cfg).to(device).eval()
    model.lm_head.weight.data.mul_(40.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 1, 7, 12, 3)]
    greedy = SamplingSettings(max_new_tokens=40, temperature=0.0)
    expected = HFGenerateEngine(lambda: model, greedy, 0, {1}).generate(prompts, seed=0)
    fast = StaticCacheEngine(lambda: model, greedy, 0, {1}, eos_check_every=8)
    got = fast.generate(prompts, seed=0)
    ok = got == expected
    return (f"fast engine greedy == generate on {device}: {ok} "
            f"(graphs captured: {fast.graphs_captured}, lengths {[len(c) for c in expected]})")


def child_main(args) -> None:
    variant = args.child
    if variant.endswith("-forced"):  # --ragged's baseline: the same variant, forced lengths
        args.ragged, variant = False, variant.removesuffix("-forced")
    try:
        result = run_reference(args) if variant == "reference" else run_ours(args, variant)
        result["variant"] = args.child
    except Exception as error:  # noqa: BLE001 - report the failure in the table, keep the others
        traceback.print_exc()
        result = {"variant": args.child, "error": f"{type(error).__name__}: {error}"[:300], **peak_memory(args.device)}
    with open(args.result, "w") as f:
        json.dump(result, f)


def fmt(value, spec="{:.2f}"):
    return "-" if value is None else spec.format(value)


def table(results: list[dict], args) -> str:
    ref = next((r for r in results if r.get("variant") == "reference" and "error" not in r), None)
    lines = [
        f"device {args.device}; student {'tiny' if args.tiny else '~0.5B'}, teacher {'tiny' if args.tiny else '~1.5B'}, "
        f"vocab {args.vocab}; prompt {args.prompt} + completion {args.completion} tokens; micro batch "
        f"{args.micro_batch} x grad accum {args.grad_accum}; lmbda 1, beta 0.5; "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"mean of {args.steps} timed step(s) after {args.warmup} warm-up",
        "",
        "| variant | tokens/s | step s | generation s | teacher fwd s | student + loss + optim s "
        "| peak GiB | tokens/s vs ref | peak vs ref |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | {fmt(r.get('peak_gib'))} | | |")
            continue
        speed = mem = "-"
        if ref is not None:
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            if r.get("peak_gib") and ref.get("peak_gib"):
                mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}x"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['generation_s']:.2f} "
            f"| {r['teacher_s']:.2f} | {r['student_s']:.2f} | {fmt(r.get('peak_gib'))} | {speed} | {mem} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    if args.skip_reference:
        variants = [v for v in variants if v != "reference"]
    if args.only_reference:
        variants = ["reference"]
    if args.ragged:
        variants += [f"{v}-forced" for v in variants if v.startswith("ours")]
    if args.check:
        print(check_fast_engine(args.device), flush=True)
        gc.collect()
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for variant in variants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--device", args.device,
               "--child", variant, "--result", path]
        start = time.perf_counter()
        try:
            subprocess.run(cmd, check=False, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            print(f"[{variant}] killed after {args.child_timeout} s", flush=True)
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError):
            result = {"variant": variant, "error": "the subprocess wrote no result (crashed?)"}
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        if args.json_dir:
            os.makedirs(args.json_dir, exist_ok=True)
            with open(os.path.join(args.json_dir, f"{variant}.json"), "w") as f:
                json.dump(result, f, indent=1)
        print(f"[{variant}] done in {result['wall_s']:.0f} s: {json.dumps(result)}", flush=True)
        print(table(results, args) + "\n", flush=True)
    if args.ragged:
        print(ragged_table(results, args), flush=True)


def ragged_table(results: list[dict], args) -> str:
    import ragged

    by_name = {r["variant"]: r for r in results}
    rows = [(r["variant"], r, by_name.get(f"{r['variant']}-forced")) for r in results
            if not r["variant"].endswith("-forced")]
    return ragged.report(rows, args.completion, args.vocab, len(stop_set(args)))


if __name__ == "__main__":
    main()
