"""Our GOLD step from a plain loop (the axolotl-free stages GoldTrainer calls): one
``prepare_window`` per optimizer step, then per micro-batch ``loss_sum / window tokens``
and backward, then the optimizer step. ``Ours`` is shared by bench_vs_reference's
``ours-*`` variants, bench_cli's plain loop and profile_student_step."""

from __future__ import annotations

import time

from bench_setup import MemoryMarks, Timers, build_models, build_prompts, special_ids, summarize


class Ours:
    """Our plain loop's parts (what GoldTrainer builds): models, engine, objective, optimizer."""

    def __init__(self, args, variant: str = "ours-fast"):
        import torch

        from axolotl_gold.rollouts.engines.base import SamplingSettings
        from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
        from axolotl_gold.rollouts.engines.static import StaticCacheEngine
        from axolotl_gold.scoring.objectives import JsdObjective

        self.device = device = torch.device(args.device)
        cuda = device.type == "cuda"
        self.dtype = torch.bfloat16 if cuda else torch.float32
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.student, self.teacher = student, teacher = build_models(args, device, self.dtype)
        if args.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        self.pad, _ = special_ids(args.vocab)
        self.sampling = sampling = SamplingSettings(max_new_tokens=args.completion, temperature=0.9, top_p=0.95)
        get = lambda: student  # noqa: E731
        self.stops = stops = set(student.generation_config.eos_token_id)  # the trainer's stop set reads it too
        forced = 0 if args.ragged else args.completion
        if variant == "ours-fast":
            engine = StaticCacheEngine(get, sampling, self.pad, stops, min_new_tokens=forced,
                                       compile_decode=args.compile, batch_size=args.generation_rows,
                                       fuse_projections=args.compile)  # as the config's default follows compile
        elif variant == "ours-hf-static":
            engine = HFGenerateEngine(get, sampling, self.pad, stops, min_new_tokens=forced,
                                      generate_kwargs={"cache_implementation": "static"})
        else:
            engine = HFGenerateEngine(get, sampling, self.pad, stops, min_new_tokens=forced)
        self.engine = engine
        self.objective = JsdObjective(beta=0.5, temperature=0.9, chunk_size=args.chunk_size, vocab_size=args.vocab)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=cuda)
        self.args = args
        self.graphed = False  # a student through torch.compile's CUDA graphs: own .grad buffers

    def own_grads(self) -> None:
        """Under CUDA graphs, the trainer's ``own_grad_buffers`` before the window's first backward."""
        if self.graphed:
            from axolotl_gold.trainer.grad_buffers import own_grad_buffers

            own_grad_buffers(self.student.parameters())

    def train(self, prepared):
        """The student side of one optimizer step (teacher forward inside): per micro-batch
        ``loss_sum / window tokens`` and backward, then the optimizer; the last sum and count."""
        from axolotl_gold.data.transfer import to_device
        from axolotl_gold.scoring.loss import loss_sum

        from axolotl_gold.trainer.attention_backends import training_attention

        total = max(prepared.local_tokens, 1)
        self.own_grads()
        for micro in prepared.micro_batches:
            batch = to_device(micro, self.device)
            with training_attention():  # as GoldTrainer.training_step
                summed, tokens = loss_sum(self.student, self.teacher, batch, self.objective, fused=True)
                (summed / total).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return summed, tokens

    def prepare(self, prompts: list[list[int]], step: int):
        """One window of on-policy rollouts (one engine call) and its micro-batches."""
        from axolotl_gold.data.batching import Rollout
        from axolotl_gold.trainer.window import prepare_window

        a = self.args
        slices = [[Rollout(prompt_ids=p, completion_ids=[]) for p in prompts[i : i + a.micro_batch]]
                  for i in range(0, len(prompts), a.micro_batch)]
        return prepare_window(slices, draws=[True] * len(slices), step=step, seed=a.seed, rank=0,
                              pad_id=self.pad, student_engine=self.engine, objective=self.objective)


def run_ours(args, variant: str) -> dict:
    ours = Ours(args, variant)
    student, engine, device, dtype, sampling = ours.student, ours.engine, ours.device, ours.dtype, ours.sampling
    timers = Timers(device)
    timers.hook_teacher(ours.teacher)

    window = args.micro_batch * args.grad_accum
    total_steps = args.warmup + args.steps
    prompts = build_prompts(args, window * total_steps)
    records = []
    memory = MemoryMarks(device)
    for step in range(total_steps):
        timers.reset()
        timers.sync()
        marks = memory.start()
        start = time.perf_counter()
        prepared = ours.prepare(prompts[step * window : (step + 1) * window], step)
        timers.generation = prepared.generation_seconds  # generate() ends on .tolist(): synced
        marks.update(memory.peak("peak_generation_gib"))
        summed, _tokens = ours.train(prepared)
        timers.sync()
        elapsed = time.perf_counter() - start
        marks.update(memory.peak("peak_step_gib"))
        lengths = prepared.window.completion_lengths()
        records.append({"step": elapsed, "generation": timers.generation, "teacher": timers.teacher,
                        "tokens": prepared.local_tokens, "lengths": lengths, **marks})
        print(f"[{variant}] step {step}: {elapsed:.2f} s, generation {timers.generation:.2f} s, "
              f"teacher {timers.teacher:.2f} s, tokens {prepared.local_tokens}, "
              f"completion lengths {min(lengths)}..{max(lengths)}, loss/token {float(summed.detach()) / max(int(_tokens), 1):.4f}",
              flush=True)
    extra = {"engine_calls": engine.calls, "engine": engine_kind(engine, device, args.compile),
             "slots": args.generation_rows}
    if args.ragged:
        extra["stop_mass"] = measured_stop_mass(student, prompts[: max(1, 1024 // args.prompt)], ours.stops, sampling, device)
    if hasattr(engine, "graphs_captured"):
        extra["graphs_captured"] = engine.graphs_captured
        extra["sampling_ms_per_token"] = sampling_cost_ms(args, sampling, device, dtype, window)
    row = summarize(variant, records, args.warmup, device, extra)
    if memory.cuda:  # the run's peak, warm-up included (the marks reset it per step)
        row["peak_gib"] = memory.overall / 2**30
    return row


def engine_kind(engine, device, compiled: bool) -> str:
    """What ragged.engine_schedule replays for this engine."""
    if type(engine).__name__ != "StaticCacheEngine":
        return "hf"
    return "static-compiled" if compiled and device.type == "cuda" else "static"


def measured_stop_mass(model, prompts, stops, sampling, device) -> float:
    """The student's sampled mass on the stop set over the prompts' positions (ragged.stop_mass)."""
    import torch

    import ragged

    ids = torch.tensor(prompts, device=device)
    return ragged.stop_mass(model, ids, sorted(stops), sampling.temperature, sampling.top_p, sampling.top_k)


def sampling_cost_ms(args, sampling, device, dtype, rows: int, repeats: int = 100) -> float:
    """Device time of StaticCacheEngine's per-token sampling alone (warping, top-p sort, draw)."""
    import torch

    from axolotl_gold.rollouts.engines.static import sample_tokens

    logits = torch.randn(rows, args.vocab, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        sample_tokens(logits.float(), sampling, generator)
    timers = Timers(device)
    timers.sync()
    start = time.perf_counter()
    for _ in range(repeats):
        sample_tokens(logits.float(), sampling, generator)
    timers.sync()
    return (time.perf_counter() - start) / repeats * 1000
