"""What the benchmarks share (bench_vs_reference, bench_cli, profile_student_step,
profile_decode's neighbours): the random-weight Qwen2-shaped models (0.5B student, 1.5B
teacher; tiny ones for CPU smoke tests), a word-level tokenizer, prompts, the ragged stop
set, device-synced timers, peak memory, and the summary of timed steps."""

from __future__ import annotations

import time

STUDENT = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
           "num_key_value_heads": 2, "intermediate_size": 4864}
TEACHER = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
           "num_key_value_heads": 2, "intermediate_size": 8960}
TINY_STUDENT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128}
TINY_TEACHER = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 256}


def special_ids(vocab: int) -> tuple[int, int]:
    """(pad, eos), at the top of the vocabulary as in Qwen2 (<|endoftext|>, <|im_end|>)."""
    return vocab - 3, vocab - 1


def build_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids (token i is "t{i}"): the reference decodes
    prompts and completions, and nothing may be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pad, eos = special_ids(vocab)
    names = {i: f"t{i}" for i in range(vocab)}
    names[pad], names[eos] = "<|endoftext|>", "<|im_end|>"
    backend = Tokenizer(models.WordLevel({n: i for i, n in names.items()}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=names[eos], pad_token=names[pad])
    tok.model_max_length = 1 << 20
    return tok


def build_models(args, device, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    pad, eos = special_ids(args.vocab)
    out = []
    for arch in (TINY_STUDENT, TINY_TEACHER) if args.tiny else (STUDENT, TEACHER):
        cfg = Qwen2Config(
            vocab_size=args.vocab, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True, use_sliding_window=False, pad_token_id=pad, eos_token_id=eos,
            bos_token_id=None, **arch,
        )
        torch.manual_seed(args.seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
        # pad is a stop token too (Qwen2's generation config lists <|endoftext|> beside <|im_end|>):
        # min_new_tokens then suppresses both, and no side cuts a rollout at a sampled pad id;
        # --ragged: the stop set every side reads, sized for a mean length (ragged.py)
        model.generation_config.eos_token_id = stop_set(args)
        model.generation_config.pad_token_id = pad
        out.append(model)
    student, teacher = out
    teacher.eval().requires_grad_(False)
    return student, teacher


def stop_set(args) -> list[int]:
    pad, eos = special_ids(args.vocab)
    if not getattr(args, "ragged", False):
        return [eos, pad]
    import ragged

    return ragged.stop_ids(args.vocab, args.completion, [eos, pad])


def build_prompts(args, count: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    pad, _ = special_ids(args.vocab)
    ids = torch.randint(0, pad, (count, args.prompt), generator=g)  # no special ids
    return ids.tolist()


class Timers:
    """Device-synced accumulators for one optimizer step."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset(self):
        self.generation = 0.0
        self.teacher = 0.0
        self.tokens = 0
        self.lengths = []
        self._teacher_start = None

    def hook_teacher(self, teacher):
        def pre(*_):
            self.sync()
            self._teacher_start = time.perf_counter()

        def post(*_):
            self.sync()
            self.teacher += time.perf_counter() - self._teacher_start

        teacher.register_forward_pre_hook(pre)
        teacher.register_forward_hook(post)

    def wrap_generate(self, model):
        original = model.generate

        def timed(*a, **k):
            self.sync()
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.sync()
                self.generation += time.perf_counter() - start

        model.generate = timed


def peak_memory(device) -> dict:
    import torch

    if torch.device(device).type != "cuda":
        return {"peak_gib": None, "reserved_gib": None}
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


class MemoryMarks:
    """Per-step CUDA memory marks, as GoldTrainer logs them (gold/memory_at_window_gib,
    gold/peak_generation_gib, gold/peak_memory_gib): allocated when the window starts,
    the peak through generation, the step's peak; ``overall`` keeps the run's peak
    across the per-step resets. All None off CUDA."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.overall = 0

    def start(self) -> dict:
        import torch

        if not self.cuda:
            return {}
        self.overall = max(self.overall, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return {"at_window_gib": torch.cuda.memory_allocated() / 2**30}

    def peak(self, key: str) -> dict:
        import torch

        if not self.cuda:
            return {}
        value = torch.cuda.max_memory_allocated()
        self.overall = max(self.overall, value)
        return {key: value / 2**30}


MEMORY_MARKS = ("at_window_gib", "peak_generation_gib", "peak_step_gib")


def summarize(name, records, warmup, device, extra=None) -> dict:
    timed = records[warmup:] or records
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    step, gen, teacher = mean("step"), mean("generation"), mean("teacher")
    tokens = mean("tokens")
    out = {
        "variant": name,
        "timed_steps": len(timed),
        "step_s": step,
        "generation_s": gen,
        "teacher_s": teacher,
        "student_s": step - gen - teacher,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step if step > 0 else 0.0,
        "all_steps_s": [round(r["step"], 3) for r in records],
        "windows": [r["lengths"] for r in timed if r.get("lengths")],
        **peak_memory(device),
    }
    for key in MEMORY_MARKS:  # means over the timed steps, where the records have them
        if all(key in r for r in timed):
            out[key] = mean(key)
    out.update(extra or {})
    return out
