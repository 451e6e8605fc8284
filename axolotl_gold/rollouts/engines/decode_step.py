"""The static engine's device-side state: one decode step on static buffers, and what a
call records per row.

``DecodeStep`` holds a call's buffers (HF ``StaticCache``, the 4-D mask, prompt lengths,
the step counter, the fed tokens) and runs the model for one token per row;
``decode_forward`` is its body, and ``compiled_decode_forward`` the same body through
``torch.compile``. ``RowState`` holds what each row sampled and whether it stopped. All of
it lives on the device and changes in place, so the engine can capture a whole token step
as one CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch

from axolotl_gold.rollouts.engines.decode_attention import grouped_decode
from axolotl_gold.rollouts.engines.static_support import (
    attention_mask_for,
    compact_cache,
    copy_cache_rows,
    static_cache,
)


class DecodeStep:
    """One token for every row: static buffers in, ``[B, V]`` logits out.

    Built for ``batch`` rows and ``total`` cache columns, then ``start``-ed for each call
    (in place, so a compiled step sees the same objects every call). ``tokens``
    (``[B, 1]``) is written by the caller before each step; ``step`` (the index of the
    token being fed, counted from 0 at the first generated token) advances inside.
    """

    def __init__(self, model, batch: int, total: int, device, grouped: bool = True, kernel: bool = True):
        self.model, self.total, self.grouped, self.kernel = model, total, grouped, kernel
        self.cache = static_cache(model.config, total)
        self.base_mask = torch.zeros((batch, 1, 1, total), dtype=torch.bool, device=device)
        self.columns = torch.arange(total, device=device)
        self.width = torch.zeros((), dtype=torch.long, device=device)
        self.prompt_lengths = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)

    def start(self, prompt_mask: torch.Tensor) -> None:
        """A new call: the prompt's ``[B, width]`` padding mask, an empty cache."""
        width = prompt_mask.shape[1]
        self.cache.reset()
        self.base_mask.zero_()
        self.base_mask[:, 0, 0, :width] = prompt_mask.bool()
        self.width.fill_(width)
        self.prompt_lengths.copy_(prompt_mask.sum(-1, keepdim=True))
        self.step.zero_()

    def __call__(self) -> torch.Tensor:
        with self.attention():
            return decode_forward(self)

    def attention(self):
        """The context the forward runs in: the grouped decode attention (its Triton
        kernel where it serves, unless ``kernel`` is False), or HF's own."""
        return grouped_decode(self.model, self.kernel) if self.grouped else contextlib.nullcontext()

    def compact(self, keep: torch.Tensor) -> None:
        """Only rows ``keep`` go on (new, smaller buffers); a captured graph of the old
        batch no longer applies."""
        compact_cache(self.cache, keep)
        self.base_mask = self.base_mask.index_select(0, keep)
        self.prompt_lengths = self.prompt_lengths.index_select(0, keep)
        self.tokens = self.tokens.index_select(0, keep)

    def take_rows(self, other: "DecodeStep", keep: torch.Tensor) -> None:
        """This step (built for ``len(keep)`` rows) continues rows ``keep`` of ``other``,
        copied into its own buffers in place."""
        copy_cache_rows(other.cache, self.cache, keep)
        self.base_mask.copy_(other.base_mask.index_select(0, keep))
        self.prompt_lengths.copy_(other.prompt_lengths.index_select(0, keep))
        self.tokens.copy_(other.tokens.index_select(0, keep))
        self.width.copy_(other.width)
        self.step.copy_(other.step)


def decode_forward(decode: DecodeStep) -> torch.Tensor:
    """The decode step's body (what ``torch.compile`` compiles when asked)."""
    # the token fed now sits at cache column width + step and attends to itself
    new = (decode.columns >= decode.width) & (decode.columns <= decode.width + decode.step)
    mask = attention_mask_for(decode.model, decode.base_mask | new)
    out = decode.model(
        input_ids=decode.tokens,
        attention_mask=mask,
        position_ids=decode.prompt_lengths + decode.step,
        past_key_values=decode.cache,
        use_cache=True,
        logits_to_keep=1,
    )
    decode.step.add_(1)
    return out.logits[:, -1]


_COMPILED = {}

# compiles the decode step may keep: one per (model, rows bucket, cache-column bucket),
# more than dynamo's default 8 in a run whose prompt widths vary; past its limit dynamo
# would run every new shape eagerly (twice as slow, with only a log line)
RECOMPILE_LIMIT = 64


def compiled_decode_forward():
    """``decode_forward`` through ``torch.compile`` (static shapes: one compile per batch
    and cache-length bucket), made once per process."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(decode_forward, dynamic=False)
    return _COMPILED["fn"]


def decode_compile_limits():
    """Dynamo's recompile limit raised to ``RECOMPILE_LIMIT`` while the decode step runs
    (it is read when a call misses the compiled cache)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(RECOMPILE_LIMIT, getattr(dynamo_config, name))})


class CompiledStep:
    """Calls a ``DecodeStep``'s forward through ``compiled_decode_forward``."""

    def __init__(self, decode: DecodeStep):
        self.decode = decode

    def __call__(self) -> torch.Tensor:
        with self.decode.attention(), decode_compile_limits():
            return compiled_decode_forward()(self.decode)


class RowState:
    """What a call records per row, on the device: sampled tokens, stopped or not, and
    for the rows still sampled (after compaction), their original index and noise seed."""

    def __init__(self, pad_id: int, max_new: int, seeds: torch.Tensor, eos: list[int], device):
        batch = seeds.numel()
        self.generated = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
        self.live = torch.arange(batch, device=device)  # the original row of each row sampled
        self.seeds = seeds
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)

    def keep(self, keep: torch.Tensor) -> None:
        self.live, self.seeds, self.finished = self.live[keep], self.seeds[keep], self.finished[keep]
