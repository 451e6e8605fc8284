"""A faster HF rollout engine: static KV cache, CUDA-graph decode step, on-GPU sampling.

``model.generate`` pays, per new token, a Python loop over logits processors, a growing
attention mask and a host sync (its stopping check); for a 0.5B model at batch 16 that
host work, not the GPU, sets the pace. Here one decode step is a fixed-shape function of
static buffers, so on CUDA it is captured once per call as a CUDA graph and replayed:

- the KV cache is HF's ``StaticCache``, sized prompt width + ``max_new_tokens``, storing
  in the dtype attention computes in (``static_support``); its write position is a
  device tensor that the step itself advances;
- decode attention reads each cached KV head once (``decode_attention``: HF's sdpa
  path copies every KV head per query head whenever a mask is given);
- the attention mask is a 4D ``[B, 1, 1, L]`` mask built on the device from the
  prompt's padding and a device step counter (HF passes a 4D mask through unchanged,
  so it is built in the form the attention implementation reads);
- sampling (temperature, top-k, top-p, then an exponential race, as vLLM does) runs on
  the device with noise that is a function of (seed, row, step) (``noise``): a row's
  sample does not depend on its batch, and EOS is checked on the host only every
  ``eos_check_every`` tokens; once half the rows have stopped, the others go on as a
  smaller batch (cache rows dropped, the graph captured anew), so stopped rows cost
  nothing afterwards.

The prompt (prefill) runs once through HF's own forward with a 2D mask, exactly as
``generate`` does. On CPU, or with ``use_cuda_graph=False``, the same loop runs eagerly;
the tests check that greedy output equals ``model.generate``'s.

Where it cannot serve a model (an attention implementation other than sdpa / eager,
sliding-window layers narrower than the sequence), the window goes through HF
``generate`` instead, with a warning naming the reason (``fallbacks`` counts them).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from axolotl_gold.data.batching import left_pad
from axolotl_gold.rollouts.engines.base import SamplingSettings, refuse_model_inputs, trim_completion
from axolotl_gold.rollouts.engines.decode_attention import grouped_decode
from axolotl_gold.rollouts.engines.noise import exponential_noise, row_seeds
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.rollouts.engines.static_support import attention_mask_for, blocker, compact_cache, static_cache

LOG = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``[B, V]`` float32 logits warped as HF does (temperature, then top-k, then top-p).

    Removed tokens get ``-inf``; the most likely token always survives. No host sync.
    """
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # a full-vocabulary sort: on an H200 0.55 ms at 16 x 151,936, where a radix select
        # over the probabilities' bits (three scatter-add histograms) took 1.24 ms
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1.0 - top_p  # HF's TopPLogitsWarper rule
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingSettings, noise: torch.Generator | torch.Tensor | None
) -> torch.Tensor:
    """``[B]`` next tokens from ``[B, V]`` logits: argmax when greedy, else a sample.

    ``noise``: ``[B, V]`` Exp(1) draws (``noise.exponential_noise``), or a generator to
    draw them from.
    """
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    # argmax(p / E) with E ~ Exp(1) samples from p, with no host sync (unlike multinomial)
    if not isinstance(noise, torch.Tensor):
        noise = torch.empty_like(probs).exponential_(generator=noise)
    return probs.div_(noise).argmax(dim=-1)


class _DecodeStep:
    """One token for every row: static buffers in, ``[B, V]`` logits out.

    ``tokens`` (``[B, 1]``) is written by the caller before each call; ``step`` (the index
    of the token being fed, counted from 0 at the first generated token) advances inside.
    """

    def __init__(
        self, model, cache, prompt_mask: torch.Tensor, prompt_lengths: torch.Tensor, total: int,
        grouped: bool = True,
    ):
        batch, width = prompt_mask.shape
        self.grouped = grouped
        device = prompt_mask.device
        self.model, self.cache, self.width = model, cache, width
        self.base_mask = torch.zeros((batch, 1, 1, total), dtype=torch.bool, device=device)
        self.base_mask[:, 0, 0, :width] = prompt_mask.bool()
        self.columns = torch.arange(total, device=device)
        self.prompt_lengths = prompt_lengths.view(batch, 1)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)

    def __call__(self) -> torch.Tensor:
        # the token fed now sits at cache column width + step and attends to itself
        new = (self.columns >= self.width) & (self.columns <= self.width + self.step)
        mask = attention_mask_for(self.model, self.base_mask | new)
        with grouped_decode(self.model) if self.grouped else contextlib.nullcontext():
            out = self.model(
                input_ids=self.tokens,
                attention_mask=mask,
                position_ids=self.prompt_lengths + self.step,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.step.add_(1)
        return out.logits[:, -1]

    def compact(self, keep: torch.Tensor) -> None:
        """Only rows ``keep`` go on (with ``compact_cache`` on the cache); a captured
        graph of the old batch no longer applies."""
        self.base_mask = self.base_mask.index_select(0, keep)
        self.prompt_lengths = self.prompt_lengths.index_select(0, keep)
        self.tokens = self.tokens.index_select(0, keep)


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
    sampling = config.vocab_size * 32  # float32 logits and probabilities, int64 hash, float64 draw
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(rows, int(FREE_MEMORY_SHARE * free) // (kv + sampling)))


class StaticCacheEngine(HFGenerateEngine):
    """Drop-in for ``HFGenerateEngine``: same constructor and ``generate`` contract.

    ``min_new_tokens`` suppresses EOS before that many tokens (benchmarks use it to force
    fixed-length rollouts). ``use_cuda_graph`` defaults to True on CUDA; on any other
    device the loop runs eagerly.
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
        compact_finished: bool = True,
    ):
        super().__init__(get_model, sampling, pad_id, eos_ids, batch_size, min_new_tokens)
        self.grouped_attention = grouped_attention
        self.compact_finished = compact_finished
        self.compactions = 0
        self.eos_check_every = max(1, eos_check_every)
        self.use_cuda_graph = use_cuda_graph
        self.graphs_captured = 0
        self.fallbacks = 0

    def _sample(self, model, prompts, seed, model_inputs) -> list[list[int]]:
        refuse_model_inputs(self, model_inputs)
        reason = blocker(model, max(map(len, prompts)) + self.sampling.max_new_tokens)
        if reason is not None:
            if not self.fallbacks:
                LOG.warning("gold: the static generation engine cannot serve %s: "
                            "sampling with HF generate instead", reason)
            self.fallbacks += 1
            return super()._sample(model, prompts, seed, model_inputs)
        device = next(model.parameters()).device
        # each row's noise is its own (seed, row index): the same samples however the
        # call is split into chunks or rows are dropped
        seeds = row_seeds(seed, torch.arange(len(prompts), device=device))
        step = self.batch_size or rows_that_fit(model, len(prompts), max(map(len, prompts)) + self.sampling.max_new_tokens)
        out: list[list[int]] = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            out.extend(self._generate_chunk(model, chunk, device, seeds[start : start + len(chunk)]))
        return out

    def _generate_chunk(self, model, prompts, device, seeds) -> list[list[int]]:
        max_new = self.sampling.max_new_tokens
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        batch, width = ids.shape
        if max_new <= 0:
            return [[] for _ in prompts]
        cache = static_cache(model.config, width + max_new)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)
        generated = torch.full((batch, max_new), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

        # prefill through HF's own mask and position logic, as generate() does
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        decode = _DecodeStep(model, cache, mask, mask.sum(-1), width + max_new, self.grouped_attention)
        live = torch.arange(batch, device=device)  # the original row of each row still sampled
        graph, graph_logits = None, None
        count = 0
        for index in range(max_new):
            if index > 0:
                if graph is not None:
                    graph.replay()
                    logits = graph_logits
                elif self._want_graph(device):
                    logits, graph, graph_logits = self._first_step_and_capture(decode)
                else:
                    logits = decode()
            logits = logits.float()
            if index < self.min_new_tokens and eos.numel():
                logits[:, eos] = float("-inf")
            greedy = self.sampling.temperature <= 0
            noise = None if greedy else exponential_noise(seeds[live], index, logits.shape[-1])
            tokens = sample_tokens(logits, self.sampling, noise)
            generated[live, index] = tokens
            count = index + 1
            if eos.numel():
                finished |= torch.isin(tokens, eos)
                if count % self.eos_check_every == 0:
                    done = int(finished.sum())  # the one host sync per check
                    if done == finished.numel():
                        break
                    if self.compact_finished and 2 * done >= finished.numel():
                        # half the rows stopped: the rest go on as a smaller batch
                        keep = (~finished).nonzero().squeeze(1)
                        compact_cache(cache, keep)
                        decode.compact(keep)
                        live, finished, tokens = live[keep], finished[keep], tokens[keep]
                        graph, graph_logits = None, None
                        self.compactions += 1
            decode.tokens.copy_(tokens.view(-1, 1))
        rows = generated[:, :count].tolist()
        del graph, graph_logits, decode, cache
        return [trim_completion(r, self.eos_ids) for r in rows]

    def _want_graph(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return True if self.use_cuda_graph is None else self.use_cuda_graph

    def _first_step_and_capture(self, decode: _DecodeStep):
        """Run the first decode step for real on a side stream (the warm-up), then capture it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = decode().clone()
        torch.cuda.current_stream().wait_stream(stream)
        logits.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        graph = torch.cuda.CUDAGraph()
        # autocast (Accelerate's, around a float32 student) must not cache weight casts
        # made inside the capture: they would be freed when the forward returns
        cache_casts = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            # capture records kernels without running them: the cache and step are untouched
            with torch.cuda.graph(graph, stream=stream):
                graph_logits = decode()
        finally:
            torch.set_autocast_cache_enabled(cache_casts)
        self.graphs_captured += 1
        return logits, graph, graph_logits
