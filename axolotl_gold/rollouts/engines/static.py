"""A faster HF rollout engine: static KV cache, CUDA-graph decode step, on-GPU sampling.

``model.generate`` pays, per new token, a Python loop over logits processors, a growing
attention mask and a host sync (its stopping check); for a 0.5B model at batch 16 that
host work, not the GPU, sets the pace. Here one token step (the decode forward, EOS
suppression, sampling, recording the token and the stop flags: ``decode_step``) is a
fixed-shape function of static device buffers, so on CUDA it is captured once per call
as one CUDA graph and replayed:

- the KV cache is HF's ``StaticCache``, sized the longest prompt + ``max_new_tokens``,
  storing in the dtype attention computes in (``static_support``); each row writes at
  its own column (its first generated column + its token index, device tensors the step
  itself advances);
- decode attention reads each cached KV head once (``decode_attention``: HF's sdpa
  path copies every KV head per query head whenever a mask is given), on CUDA in two
  Triton launches that read only the columns filled so far (``decode_kernel``;
  ``decode_kernel=False`` keeps the tensor version);
- the attention mask is a 4D ``[B, 1, 1, L]`` mask built on the device from each
  row's prompt padding and token index (HF passes a 4D mask through unchanged,
  so it is built in the form the attention implementation reads);
- sampling (temperature, top-k, top-p, then the CDF inverted at one uniform per row:
  ``sampling``) runs on the device with a uniform that is a function of (seed, row,
  step) (``noise``): a row's sample does not depend on its batch;
- the host reads the stop flags only every ``eos_check_every`` tokens and at the step a
  row samples its last token (``slots``). When a call has more prompts than fit at once,
  a slot whose row stopped starts the next waiting prompt there and then (its prompt
  prefilled alone and placed in the slot's cache row, in place, so the captured graph
  still applies): each slot has its own cache columns, positions and token index. Once
  no prompt waits and half the rows have stopped, the others go on as a smaller batch
  (cache rows dropped, the graph captured anew);
- with ``compile_decode`` the step goes through ``torch.compile`` (fused pointwise
  kernels: 3.35 -> 1.74 ms per decode forward of a 0.5B model at batch 16 on an H200)
  before it is captured; shapes are bucketed (cache columns, power-of-two rows) and each
  bucket's buffers are kept between calls, so the compile happens once per bucket.

Prompts (prefill) run through HF's own forward with a 2D mask, exactly as ``generate``
does (with images: the processor's batch, ``pixel_values`` and the rest, in that one
forward), the call's first prompts straight into the cache, a refill's into a cache of
its own copied into its slots; a float32 head under autocast (Axolotl's full fine-tune)
is cast once for the call's decode steps instead of by autocast in every step
(``static_support``).
On CPU, or with ``use_cuda_graph=False``, the same loop runs eagerly; the tests check
that greedy output equals ``model.generate``'s.

Where it cannot serve a model (an attention implementation other than sdpa / eager,
sliding-window layers narrower than the sequence, image prompts of a model that places
its own rotary positions), the window goes through HF
``generate`` instead, with a warning naming the reason (``fallbacks`` counts them).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from axolotl_gold.data.batching import left_pad, round_up
from axolotl_gold.rollouts.engines.base import SamplingSettings, trim_completion
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine, _to_model
from axolotl_gold.rollouts.engines.noise import row_seeds, row_uniforms
from axolotl_gold.rollouts.engines.decode_step import CompiledStep, DecodeStep, RowState
from axolotl_gold.rollouts.engines.fused_projections import fused_projections
from axolotl_gold.rollouts.engines.sampling import filter_logits, sample_tokens  # noqa: F401 (re-exported)
from axolotl_gold.rollouts.engines.slots import COMPILE_MIN_ROWS, SlotQueue, compiled_rows  # noqa: F401 (re-exported)
from axolotl_gold.rollouts.engines.static_support import autocast_head, blocker, position_blocker, precast_head

LOG = logging.getLogger(__name__)


# cache columns are rounded up to a multiple of this when the step is compiled, so
# prompts of different widths share a compiled shape
COMPILE_COLUMNS = 256
# share of the free device memory one chunk of rollouts may take (KV cache and sampling
# buffers), when the number of rows generated at once is not set
FREE_MEMORY_SHARE = 0.5


def rows_that_fit(model, rows: int, columns: int) -> int:
    """How many rows to generate at once: all, unless their KV cache and per-token
    sampling buffers would take more than ``FREE_MEMORY_SHARE`` of the free device memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return rows
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = 2 if torch.is_autocast_enabled("cuda") else next(model.parameters()).element_size()
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * columns * itemsize
    sampling = config.vocab_size * 32  # the sort's values and int64 order, float32 probabilities, float64 CDF
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(rows, int(FREE_MEMORY_SHARE * free) // (kv + sampling)))


class StaticCacheEngine(HFGenerateEngine):
    """Drop-in for ``HFGenerateEngine``: same constructor and ``generate`` contract.

    ``batch_size`` caps the rows decoded at once (default: as many as fit, ``rows_that_fit``);
    with more prompts, ``refill_slots`` (default) starts waiting prompts in slots whose row
    stopped, and ``refill_slots=False`` runs one batch after another. ``token_steps``,
    ``row_steps``, ``refills`` and ``compactions`` count what the calls ran.

    ``min_new_tokens`` suppresses EOS before that many tokens (benchmarks use it to force
    fixed-length rollouts). ``use_cuda_graph`` defaults to True on CUDA; on any other
    device the loop runs eagerly. ``compile_decode`` (CUDA only) runs the decode step
    through ``torch.compile`` before capturing it: cache columns rounded up to
    ``COMPILE_COLUMNS``, rows compacted to power-of-two buckets, and the step's buffers
    kept between calls per bucket, so a run compiles once per bucket; ``compile_mode`` is
    torch.compile's (None: its default; ``max-autotune-no-cudagraphs`` tunes the GEMMs).
    ``fuse_projections``: the decode steps run each layer's q/k/v and gate/up projections as
    one GEMM each on a copy of their weights (``fused_projections``; memory for the copies).
    """

    def __init__(
        self,
        get_model: Callable[[], torch.nn.Module],
        sampling: SamplingSettings,
        pad_id: int,
        eos_ids: set[int],
        batch_size: int | None = None,
        min_new_tokens: int = 0,
        eos_check_every: int = 32,
        use_cuda_graph: bool | None = None,
        grouped_attention: bool = True,
        decode_kernel: bool = True,
        compact_finished: bool = True,
        compile_decode: bool = False,
        compile_mode: str | None = None,
        fuse_projections: bool = False,
        refill_slots: bool = True,
        generate_kwargs: dict | None = None,
    ):
        # suppress_tokens: honoured on the device; synced_gpus: for the generate fallback only
        unknown = set(generate_kwargs or {}) - {"suppress_tokens", "synced_gpus"}
        if unknown:
            raise ValueError(f"StaticCacheEngine takes `suppress_tokens` and `synced_gpus` of generate's "
                             f"keyword arguments, not {sorted(unknown)}")
        super().__init__(get_model, sampling, pad_id, eos_ids, batch_size, min_new_tokens, generate_kwargs)
        self.suppress_tokens = sorted(self.generate_kwargs.get("suppress_tokens") or [])
        self.grouped_attention = grouped_attention
        self.decode_kernel = decode_kernel
        self.compact_finished = compact_finished
        self.compile_decode = compile_decode
        self.compile_mode = compile_mode
        self.fuse_projections = fuse_projections
        self.refill_slots = refill_slots
        self.compactions = 0
        self.refills = 0  # prompts started in a slot another prompt had stopped in
        self.token_steps = 0  # decode steps run, all calls
        self.row_steps = 0  # rows those steps ran (stopped rows not yet dropped included)
        self.eos_check_every = max(1, eos_check_every)
        self.use_cuda_graph = use_cuda_graph
        self.graphs_captured = 0
        self.fallbacks = 0
        self._steps: dict[tuple, DecodeStep] = {}  # compiled: the decode buffers per bucket

    def _sample(self, model, prompts, seed, model_inputs) -> list[list[int]]:
        vision = model_inputs is not None  # prompts with images: the processor's batch
        width = model_inputs["input_ids"].shape[1] if vision else max(map(len, prompts))
        reason = blocker(model, width + self.sampling.max_new_tokens) or (position_blocker(model) if vision else None)
        if reason is not None:
            if not self.fallbacks:
                LOG.warning("gold: the static generation engine cannot serve %s: "
                            "sampling with HF generate instead", reason)
            self.fallbacks += 1
            return super()._sample(model, prompts, seed, model_inputs)
        device = next(model.parameters()).device
        # each row's noise is its own (seed, row index): the same samples however many
        # slots the call has, whichever slot a prompt lands in, whichever rows are dropped
        seeds = row_seeds(seed, torch.arange(len(prompts), device=device))
        if vision:  # one batch: the processor's image tensors are not split by row
            return self._generate(model, prompts, device, seeds, len(prompts), model_inputs)
        slots = self.batch_size
        if not slots:
            slots = rows_that_fit(model, len(prompts), width + self.sampling.max_new_tokens)
            if slots < len(prompts) and self._compiling(device):
                # what fits moves with free memory from call to call: a power of two keeps
                # the compiled shapes few (a new row count would compile anew)
                slots = 1 << (slots.bit_length() - 1)
        if self.refill_slots:
            return self._generate(model, prompts, device, seeds, slots)
        out: list[list[int]] = []  # one batch after another, each until its longest row
        for start in range(0, len(prompts), slots):
            out.extend(self._generate(model, prompts[start : start + slots], device, seeds[start : start + slots], slots))
        return out

    def _compiling(self, device: torch.device) -> bool:
        return self.compile_decode and self._want_graph(device)

    def _decode_step(self, model, batch: int, total: int, device) -> DecodeStep:
        """A fresh step, or (compiled) the bucket's kept one."""
        if not self._compiling(device):
            return DecodeStep(model, batch, total, device, self.grouped_attention, self.decode_kernel)
        key = (id(model), batch, total)
        if key not in self._steps:
            if any(k[0] != id(model) for k in self._steps):
                self._steps.clear()  # another model: its buffers and compiled shapes go
            LOG.info("gold: compiling the decode step for %d rows x %d cache columns (once per shape)",
                     batch, total)
            self._steps[key] = DecodeStep(model, batch, total, device, self.grouped_attention, self.decode_kernel)
        return self._steps[key]

    def _generate(self, model, prompts, device, seeds, slots: int, model_inputs: dict | None = None) -> list[list[int]]:
        """Completions of ``prompts`` through ``slots`` rows at once: the first prompts
        start together, and a slot whose row stopped starts the next waiting prompt.
        ``model_inputs``: the processor's batch of all the prompts (``slots`` holds them)."""
        max_new = self.sampling.max_new_tokens
        if max_new <= 0 or not prompts:
            return [[] for _ in prompts]
        compiling = self._compiling(device)
        width = model_inputs["input_ids"].shape[1] if model_inputs is not None else max(map(len, prompts))
        total = width + max_new  # any prompt fits any slot
        if compiling:
            total = round_up(total, COMPILE_COLUMNS)
        batch = min(slots, len(prompts))
        decode = self._decode_step(model, batch, total, device)
        decode.reset(max_new)
        rows = RowState(self.pad_id, max_new, seeds, sorted(self.eos_ids), device, batch, self.suppress_tokens)
        every = self.eos_check_every if self.eos_ids else None
        queue = SlotQueue(len(prompts), batch, max_new, every, self.compact_finished, buckets=compiling)
        with autocast_head(model) as probe:
            self._start(model, prompts, decode, rows, queue.start(range(batch)), model_inputs)
            while max_new == 1 and queue.waiting:  # token 0 is all: prefills only
                self._start(model, prompts, decode, rows, queue.start(range(batch)))
        if max_new > 1:
            # a float32 head under autocast: cast once; projections on one input: one GEMM
            with precast_head(model, probe.autocast_dtype), fused_projections(model, self.fuse_projections):
                self._decode_tokens(model, prompts, decode, rows, queue, device, compiling, total)
        self.token_steps += queue.count
        self.row_steps += queue.row_steps
        self.refills += queue.refills
        self.compactions += queue.compactions
        return [trim_completion(r, self.eos_ids) for r in rows.completions()]

    def _start(self, model, prompts, decode: DecodeStep, rows: RowState, started: dict[int, int],
               model_inputs: dict | None = None) -> None:
        """Slot -> prompt pairs ``started`` begin: their prompts prefilled into the slots
        and their token 0 sampled (``model_inputs``: every slot, from the processor's batch)."""
        slots = torch.tensor(list(started), device=decode.starts.device)
        everyone = list(started) == list(range(decode.starts.numel()))  # the call's first prompts
        extra = None
        if model_inputs is not None:
            param = next(model.parameters())
            extra = {k: _to_model(v, param) for k, v in model_inputs.items()}
            ids, mask = extra.pop("input_ids"), extra.pop("attention_mask")
        else:
            ids, mask = left_pad([prompts[i] for i in started.values()], self.pad_id)
        logits = decode.prefill(ids.to(slots.device), mask.to(slots.device), None if everyone else slots, extra)
        rows.assign(slots, torch.tensor(list(started.values()), device=slots.device))
        self._emit(logits, decode, rows, slots)

    def _decode_tokens(self, model, prompts, decode: DecodeStep, rows: RowState, queue: SlotQueue,
                       device, compiling: bool, total: int) -> None:
        """Token steps until every prompt is done. At each check the queue planned (one
        host sync), stopped slots take waiting prompts, or, none waiting, the call ends
        or the rows still sampling go on as a smaller batch (``slots.SlotQueue``)."""
        queue.plan()
        graph = None
        while True:
            if queue.count == queue.next_check:
                check = queue.check(rows.finished.tolist())  # the one host sync per check
                if check.done:
                    return
                if check.started:  # in place: a captured graph still applies
                    self._start(model, prompts, decode, rows, check.started)
                elif check.keep is not None:
                    decode = self._compact(model, decode, rows, check.keep, device, compiling, total)
                    graph = None
            if graph is not None:
                graph.replay()
            elif self._want_graph(device):
                # one token step (forward, sampling, bookkeeping) captured as one graph
                _, graph, _ = self._first_step_and_capture(self._token_step(decode, rows, compiling))
            else:
                self._token_step(decode, rows, compiling)()
            queue.stepped()

    def _compact(self, model, decode: DecodeStep, rows: RowState, keep: list[int], device,
                 compiling: bool, total: int) -> DecodeStep:
        """Only slots ``keep`` go on: in a smaller step (compiled: the bucket's kept one) or
        in the same step's smaller buffers."""
        index = torch.tensor(keep, device=device)
        if compiling:
            smaller = self._decode_step(model, len(keep), total, device)
            smaller.take_rows(decode, index)
            decode = smaller
        else:
            decode.compact(index)
        rows.keep(index)
        return decode

    def _token_step(self, decode: DecodeStep, rows: RowState, compiling: bool) -> Callable[[], None]:
        """One whole token step on static buffers: the decode forward, then ``_emit``."""
        forward = CompiledStep(decode, self.compile_mode) if compiling else decode

        def step() -> None:
            self._emit(forward(), decode, rows)

        return step

    def _emit(self, logits: torch.Tensor, decode: DecodeStep, rows: RowState, slots: torch.Tensor | None = None) -> None:
        """Sample each slot's token ``decode.steps`` from ``logits`` (all slots, or the
        rows of ``slots``) and record it, all on the device (no host sync: capturable)."""
        pick = (lambda t: t) if slots is None else (lambda t: t[slots])  # noqa: E731
        index, finished = pick(decode.steps), pick(rows.finished)
        if rows.suppress.numel():  # tokens never sampled (a VLM's image tokens)
            logits.index_fill_(1, rows.suppress, float("-inf"))
        if self.min_new_tokens and rows.eos.numel():
            suppress = (index < self.min_new_tokens).unsqueeze(1)
            logits[:, rows.eos] = torch.where(suppress, float("-inf"), logits[:, rows.eos])
        greedy = self.sampling.temperature <= 0
        tokens = sample_tokens(logits, self.sampling, None if greedy else row_uniforms(pick(rows.seeds), index))
        # a slot that stopped writes to the spare last column
        rows.generated.index_put_((pick(rows.live), torch.where(finished, rows.max_new, index)), tokens)
        stop = index >= rows.max_new - 1
        if rows.eos.numel():
            # not torch.isin: with 15+ stop ids (16 rows) it sorts and syncs, which breaks capture
            stop = stop | (tokens.unsqueeze(1) == rows.eos).any(1)
        if slots is None:
            rows.finished |= stop
            decode.tokens.copy_(tokens.view(-1, 1))
        else:
            rows.finished[slots] = finished | stop
            decode.tokens[slots] = tokens.view(-1, 1)

    def _want_graph(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return True if self.use_cuda_graph is None else self.use_cuda_graph

    def _first_step_and_capture(self, step: Callable[[], torch.Tensor | None]):
        """Run ``step`` for real on a side stream (the warm-up), then capture it; returns
        (the warm-up's output, the graph, the graph's output buffer)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = step()
            logits = None if logits is None else logits.clone()
        torch.cuda.current_stream().wait_stream(stream)
        if logits is not None:
            logits.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        graph = torch.cuda.CUDAGraph()
        # autocast (Accelerate's, around a float32 student) must not cache weight casts
        # made inside the capture: they would be freed when the forward returns
        cache_casts = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            # capture records kernels without running them: the cache and step are untouched.
            # thread_local: CUDA calls of other threads (NCCL's watchdog polling the events of
            # earlier collectives under FSDP2 / ZeRO-3 / DDP, a teacher server's prefetch
            # thread) cannot invalidate the capture; this thread's stay checked
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                graph_logits = step()
        finally:
            torch.set_autocast_cache_enabled(cache_casts)
        self.graphs_captured += 1
        return logits, graph, graph_logits
