"""The static engine's device-side state: one decode step on static buffers, and what a
call records per prompt.

``DecodeStep`` holds a call's buffers (HF ``StaticCache``, the 4-D mask, each slot's prompt
length, first generated column and token index, the fed tokens), prefills prompts into
slots and runs the model for one token per slot; ``decode_forward`` is its body, and
``compiled_decode_forward`` the same body through ``torch.compile``. ``RowState`` holds
what each prompt sampled and, per slot, which prompt it samples for and whether it
stopped. All of it lives on the device and changes in place, so the engine can capture a
whole token step as one CUDA graph and keep it while slots take new prompts.
"""

from __future__ import annotations

import contextlib

import torch

from axolotl_gold.rollouts.engines.decode_attention import grouped_decode
from axolotl_gold.rollouts.engines.static_support import (
    attention_mask_for,
    compact_cache,
    copy_cache_rows,
    place_prompt_rows,
    static_cache,
)


class DecodeStep:
    """One token for every row: static buffers in, ``[B, V]`` logits out.

    Built for ``batch`` rows (slots) and ``total`` cache columns, ``reset`` for each call
    (in place, so a compiled step sees the same objects every call). A slot starts a
    prompt with its keys and values at columns ``[0, width)`` and its generated tokens
    from column ``width`` on (``prefill``). Slots are independent: each has its own
    first generated column (``starts``) and token index (``steps``, the index of the
    token fed next, counted from 0 at the first generated token, advanced inside the
    step), so a slot whose row stopped can start another prompt while the others go on. ``tokens`` (``[B, 1]``) is written by the caller before each step.
    """

    def __init__(self, model, batch: int, total: int, device, grouped: bool = True, kernel: bool = True):
        self.model, self.total, self.grouped, self.kernel = model, total, grouped, kernel
        self.cache = static_cache(model.config, total)
        self.base_mask = torch.zeros((batch, 1, 1, total), dtype=torch.bool, device=device)
        self.columns = torch.arange(total, device=device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.last = torch.full((batch,), total - 1, dtype=torch.long, device=device)  # each slot's last fed column
        self.max_new = total
        self.prompt_lengths = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self._write_at(torch.zeros(batch, dtype=torch.long, device=device))

    def _write_at(self, columns: torch.Tensor) -> None:
        """The ``[B]`` cache column each slot's token is written to (filled by the step)."""
        self.write_at = columns
        self._layers_write_at(columns)

    def _layers_write_at(self, columns: torch.Tensor | None) -> None:
        for layer in self.cache.layers:
            layer.write_at = columns

    def reset(self, max_new: int | None = None) -> None:
        """A new call (of ``max_new`` tokens a prompt; default: as many as the cache
        holds): every slot empty."""
        self.max_new = max_new or self.total
        self.cache.reset()
        self.base_mask.zero_()
        self.steps.zero_()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None = None,
                extra: dict | None = None) -> torch.Tensor:
        """Slots ``slots`` start the left-padded prompts ``ids`` (padding ``mask``),
        prefilled through HF's own mask and position logic (as ``generate`` does), their
        keys and values at columns ``[0, width)``; returns their last position's
        ``[len(slots), V]`` logits. ``slots`` None: every slot (a call's first prompts),
        prefilled straight into this cache; else into a cache of their own, then copied
        into those slots' rows (the other slots go on untouched). ``extra``: more inputs of
        the prompt forward only (a processor's ``pixel_values``, ``token_type_ids``, ...)."""
        width, everyone = ids.shape[1], slots is None
        if everyone:
            slots = torch.arange(self.starts.numel(), device=ids.device)
            cache = self.cache
            self._layers_write_at(None)  # HF's one write position, from column 0
            for layer in cache.layers:
                layer.cumulative_length.zero_()
        else:
            cache = static_cache(self.model.config, width)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        try:
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1, **(extra or {}),
            ).logits[:, -1]
        finally:
            self._layers_write_at(self.write_at)
        if not everyone:
            place_prompt_rows(cache, self.cache, slots, self.starts.numel())
        self.base_mask[slots] = False
        self.base_mask[slots, 0, 0, :width] = mask.bool()
        self.starts[slots] = width
        # the column of the last token a slot feeds (token max_new - 2; the last is only sampled)
        self.last[slots] = max(width, min(width + self.max_new - 1, self.total) - 1)
        self.steps[slots] = 0
        self.prompt_lengths[slots] = mask.sum(-1, keepdim=True)
        return logits

    def __call__(self) -> torch.Tensor:
        with self.attention():
            return decode_forward(self)

    def attention(self):
        """The context the forward runs in: the grouped decode attention (its Triton
        kernel where it serves, unless ``kernel`` is False), or HF's own."""
        return grouped_decode(self.model, self.kernel) if self.grouped else contextlib.nullcontext()

    def compact(self, keep: torch.Tensor) -> None:
        """Only slots ``keep`` go on (new, smaller buffers); a captured graph of the old
        batch no longer applies."""
        compact_cache(self.cache, keep)
        self.base_mask = self.base_mask.index_select(0, keep)
        self.starts = self.starts.index_select(0, keep)
        self.last = self.last.index_select(0, keep)
        self.steps = self.steps.index_select(0, keep)
        self.prompt_lengths = self.prompt_lengths.index_select(0, keep)
        self.tokens = self.tokens.index_select(0, keep)
        self._write_at(self.write_at.index_select(0, keep))

    def take_rows(self, other: "DecodeStep", keep: torch.Tensor) -> None:
        """This step (built for ``len(keep)`` slots) continues slots ``keep`` of ``other``,
        copied into its own buffers in place."""
        copy_cache_rows(other.cache, self.cache, keep)
        for name in ("base_mask", "starts", "last", "steps", "prompt_lengths", "tokens"):
            getattr(self, name).copy_(getattr(other, name).index_select(0, keep))


def decode_forward(decode: DecodeStep) -> torch.Tensor:
    """The decode step's body (what ``torch.compile`` compiles when asked)."""
    # each slot's fed token sits at cache column start + step and attends to itself. A
    # slot whose row stopped goes on until it is refilled or dropped, held at its last
    # column (its output is never read): its positions never pass what generate would
    # use, since HF's dynamic / long RoPE rescales for the whole batch by the largest
    column = torch.minimum(decode.starts + decode.steps, decode.last)
    new = (decode.columns >= decode.starts.view(-1, 1, 1, 1)) & (decode.columns <= column.view(-1, 1, 1, 1))
    mask = attention_mask_for(decode.model, decode.base_mask | new)
    decode.write_at.copy_(column)
    out = decode.model(
        input_ids=decode.tokens,
        attention_mask=mask,
        position_ids=decode.prompt_lengths + (column - decode.starts).view(-1, 1),
        past_key_values=decode.cache,
        use_cache=True,
        logits_to_keep=1,
    )
    decode.steps.add_(1)
    return out.logits[:, -1]


_COMPILED = {}

# compiles the decode step may keep: one per (model, rows bucket, cache-column bucket),
# more than dynamo's default 8 in a run whose prompt widths vary; past its limit dynamo
# would run every new shape eagerly (twice as slow, with only a log line)
RECOMPILE_LIMIT = 64


def compiled_decode_forward(mode: str | None = None):
    """``decode_forward`` through ``torch.compile`` (static shapes: one compile per batch
    and cache-length bucket), made once per process and ``mode`` (torch.compile's; the
    engine captures the step itself, so a mode's own CUDA graphs are not wanted)."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(decode_forward, dynamic=False, mode=mode)
    return _COMPILED[mode]


def decode_compile_limits():
    """Dynamo's recompile limit raised to ``RECOMPILE_LIMIT`` while the decode step runs
    (it is read when a call misses the compiled cache)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(RECOMPILE_LIMIT, getattr(dynamo_config, name))})


class CompiledStep:
    """Calls a ``DecodeStep``'s forward through ``compiled_decode_forward`` (``mode``: torch.compile's)."""

    def __init__(self, decode: DecodeStep, mode: str | None = None):
        self.decode, self.mode = decode, mode

    def __call__(self) -> torch.Tensor:
        with self.decode.attention(), decode_compile_limits():
            return compiled_decode_forward(self.mode)(self.decode)


class RowState:
    """What a call records, on the device: the sampled tokens of each of its ``n`` prompts
    (``generated``, one spare column last, where slots that stopped write what they still
    sample), and per slot the prompt it samples for (``live``), that prompt's noise seed
    and whether it stopped (an empty slot counts as stopped); ``eos`` and ``suppress``
    (tokens never sampled) are the call's."""

    def __init__(self, pad_id: int, max_new: int, seeds: torch.Tensor, eos: list[int], device, slots: int,
                 suppress: list[int] = ()):
        self.max_new = max_new
        self.generated = torch.full((seeds.numel(), max_new + 1), pad_id, dtype=torch.long, device=device)
        self.prompt_seeds = seeds
        self.live = torch.zeros(slots, dtype=torch.long, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.finished = torch.ones(slots, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.suppress = torch.tensor(list(suppress), dtype=torch.long, device=device)

    def assign(self, slots: torch.Tensor, prompts: torch.Tensor) -> None:
        """Slots ``slots`` now sample for prompts ``prompts`` (in place)."""
        self.live[slots] = prompts
        self.seeds[slots] = self.prompt_seeds[prompts]
        self.finished[slots] = False

    def keep(self, keep: torch.Tensor) -> None:
        self.live, self.seeds, self.finished = self.live[keep], self.seeds[keep], self.finished[keep]

    def completions(self) -> list[list[int]]:
        return self.generated[:, : self.max_new].tolist()
