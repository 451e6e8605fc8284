"""Sampling with an in-process vLLM ``LLM``: shared by the colocated engine and the
rollout server (one request per distinct prompt, non-finite samples dropped)."""

from __future__ import annotations

import logging
import math
import os

from axolotl_gold.rollouts.engines.base import SamplingSettings, trim_completion

LOG = logging.getLogger(__name__)


def ensure_process_group() -> None:
    """external_launcher needs torch.distributed; a single process gets a gloo group."""
    import torch.distributed as dist

    # external_launcher reads the launcher's environment even for one process
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def shield_lazy_module_objects() -> None:
    """Let vLLM's start-up scan of ``sys.modules`` pass llvmlite's lazy ``lib`` object.

    vLLM (CPU build) rebinds Triton kernels by reading ``vars(obj)`` of every module
    attribute. llvmlite's ``ffi.lib`` (imported with numba, which Axolotl pulls in)
    answers any missing attribute, ``__dict__`` included, with a function wrapper, and
    the scan fails on it (``'_lib_fn_wrapper' object has no attribute 'get'``). Giving it
    a real ``__dict__`` entry in its lazy table makes the scan see an empty namespace.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


def model_runner(llm):
    """The in-process model runner of an ``LLM`` (V1 engine without multiprocessing)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def prompt_groups(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """``(first row, count)`` of each run of identical consecutive prompts.

    The window sampler puts a prompt's ``num_generations`` copies next to each other,
    so each run becomes one request with ``n = count`` samples.
    """
    groups: list[tuple[int, int]] = []
    for row, prompt in enumerate(prompts):
        if groups and prompts[groups[-1][0]] == prompt:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((row, 1))
    return groups


def sample_rollouts(llm, prompts, sampling: SamplingSettings, seed: int, eos_ids, min_new_tokens=0):
    """One completion per row from ``llm``; rows with non-finite log-probs emptied.

    One request per distinct prompt (run of identical rows) with ``n`` samples and its
    own seed, so results do not depend on how the window is batched. Returns
    ``(completions in row order, number of dropped rows)``.
    """
    from vllm import SamplingParams

    groups = prompt_groups([list(p) for p in prompts])
    greedy = sampling.temperature == 0  # vLLM refuses n > 1 when greedy; copies are equal
    params = [
        SamplingParams(
            n=1 if greedy else count,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,
            seed=(seed + i) % 2**31,
            min_tokens=min_new_tokens,
            # the run's stop set (the other engines' ``stop_ids``): vLLM stops there
            # instead of sampling on to ``max_tokens`` and leaving the cut to ``trim``
            stop_token_ids=sorted(int(t) for t in eos_ids),
        )
        for i, (_, count) in enumerate(groups)
    ]
    requests = [{"prompt_token_ids": list(prompts[first])} for first, _ in groups]
    outputs = llm.generate(requests, params, use_tqdm=False)
    completions, dropped = [], 0
    for (first, count), out in zip(groups, outputs):
        samples = list(out.outputs) * count if greedy else list(out.outputs)
        if len(samples) != count:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for {count} requested")
        for k, sample in enumerate(samples):
            ids = trim_completion(list(sample.token_ids), set(eos_ids))
            if not _finite_logprobs(sample, len(ids)):
                LOG.warning("vLLM returned non-finite log-probs for row %d: dropped from training", first + k)
                dropped += 1
                ids = []
            completions.append(ids)
    return completions, dropped


def _finite_logprobs(sample, n: int) -> bool:
    if sample.logprobs is None:
        return True
    for token, entry in zip(sample.token_ids[:n], sample.logprobs[:n]):
        value = entry[token].logprob if token in entry else None
        if value is None or not math.isfinite(value):
            return False
    return True
