"""vLLM inside the training process (``vllm_mode: colocate``).

One engine per training process, started from the student checkpoint with
``distributed_executor_backend="external_launcher"`` (it joins the process's
``torch.distributed`` group instead of spawning workers). Before a window's single
``generate`` call, the engine pulls the student's current weights if an optimizer
step happened since the last pull (every ``sync_every`` steps): full weights for a
full fine-tune; for a LoRA student, only the modules LoRA changes, merged on the fly
(``W + scale * B @ A``), never the whole model.

Sampled-token log-probabilities come back with the completions; a completion whose
log-probabilities are not finite is reported and dropped from training (its row
keeps an empty completion, which scores no token).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Iterator

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings, refuse_model_inputs, trim_completion

LOG = logging.getLogger(__name__)


def _ensure_process_group() -> None:
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


# vLLM stores these projections fused in one parameter; reloading one shard alone
# leaves the others undefined (NaN on the CPU build), so a group is pushed whole
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _shield_lazy_module_objects() -> None:
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


def lora_merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, weight) of the modules LoRA changes, merged (``W + B A s``).

    Names are the base checkpoint's (``model.layers.0.self_attn.q_proj.weight``), as
    vLLM's loader expects. A module fused with others in vLLM (q/k/v, gate/up) brings
    its siblings and their biases along; every other module is left out.
    """
    modules = dict(model.named_modules())
    wanted: list[str] = []
    for name, module in modules.items():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in _FUSED_GROUPS if leaf in g), (leaf,))
            wanted += [f"{parent}.{sibling}" for sibling in group if f"{parent}.{sibling}" in modules]
    for name in dict.fromkeys(wanted):
        module = modules[name]
        base = getattr(module, "base_layer", module)
        weight = base.weight
        if hasattr(module, "lora_A"):
            weight = weight + module.get_delta_weight("default")
        yield _checkpoint_name(name) + ".weight", weight.detach()
        if base.bias is not None:
            yield _checkpoint_name(name) + ".bias", base.bias.detach()


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in model.state_dict().items():
        yield _checkpoint_name(name), tensor.detach()


def _checkpoint_name(name: str) -> str:
    for prefix in ("base_model.model.", "module."):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "")


class VLLMColocateEngine:
    """vLLM rollouts in this process; same contract as ``HFGenerateEngine``."""

    def __init__(
        self,
        model_path: str,
        get_model: Callable[[], torch.nn.Module],
        get_step: Callable[[], int],
        sampling: SamplingSettings,
        eos_ids: set[int],
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        sync_every: int = 1,
        dtype: str = "auto",
        min_new_tokens: int = 0,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        _ensure_process_group()
        _shield_lazy_module_objects()
        from vllm import LLM

        self.get_model = get_model
        self.get_step = get_step
        self.sampling = sampling
        self.eos_ids = set(eos_ids)
        self.sync_every = max(1, sync_every)
        self.min_new_tokens = min_new_tokens
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = LLM(
            model=model_path,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            dtype=dtype,
            enforce_eager=True,
        )
        self.calls = 0
        self.syncs = 0
        self.sync_seconds = 0.0
        self.dropped = 0
        self._synced_step = 0  # the engine starts from the checkpoint = step 0's weights
        if enable_sleep_mode:
            self.llm.sleep(level=1)

    # ------------------------------------------------------------------ weights
    def _model_runner(self):
        return model_runner(self.llm)

    def sync_weights(self) -> None:
        """Push the student's current weights (LoRA: only the changed modules)."""
        import time

        start = time.perf_counter()
        model_runner(self.llm).reload_weights(weights_iterator=student_weights(self.get_model()))
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - start

    def _maybe_sync(self) -> None:
        step = self.get_step()
        if step - self._synced_step >= self.sync_every:
            self.sync_weights()
            self._synced_step = step

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompts: list[list[int]], seed: int, model_inputs: dict | None = None
    ) -> list[list[int]]:
        refuse_model_inputs(self, model_inputs)
        self.calls += 1
        if not prompts:
            return []
        if self.enable_sleep_mode:
            self.llm.wake_up()
        self._maybe_sync()
        completions, dropped = sample_rollouts(
            self.llm, prompts, self.sampling, seed, self.eos_ids, self.min_new_tokens
        )
        self.dropped += dropped
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)
        return completions


def model_runner(llm):
    """The in-process model runner of an ``LLM`` (V1 engine without multiprocessing)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def student_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What a sync pushes: LoRA's merged changed modules, or every weight."""
    is_lora = any(hasattr(m, "lora_A") for m in model.modules())
    return lora_merged_weights(model) if is_lora else full_weights(model)


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
