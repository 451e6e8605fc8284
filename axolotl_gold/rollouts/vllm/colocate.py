"""vLLM inside the training process (``vllm_mode: colocate``).

One engine per training process, started from the student checkpoint with
``distributed_executor_backend="external_launcher"`` (it joins the process's
``torch.distributed`` group instead of spawning workers). Before a window's single
``generate`` call, the engine pulls the student's current weights if an optimizer
step happened since the last pull (every ``sync_every`` steps), and always before the
run's first window (the engine starts from the base checkpoint, which is not the
student when an adapter is resumed from ``lora_model_dir``, when ``modules_to_save``
differ, or when a QLoRA student computes with its dequantized 4-bit base): full
weights for a full fine-tune; for an adapter, only what it changes, merged with peft's
own merge logic (``weights``), never the whole model.

Sampled-token log-probabilities come back with the completions; a completion whose
log-probabilities are not finite is reported and dropped from training (its row
keeps an empty completion, which scores no token).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings, refuse_model_inputs
from axolotl_gold.rollouts.vllm.sampling import (
    ensure_process_group,
    model_runner,
    sample_rollouts,
    shield_lazy_module_objects,
)
from axolotl_gold.rollouts.vllm.synced import SyncedEngine


class VLLMColocateEngine(SyncedEngine):
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
        enforce_eager: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        ensure_process_group()
        shield_lazy_module_objects()
        from vllm import LLM

        super().__init__(get_model, get_step, sampling, eos_ids, sync_every, min_new_tokens)
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = LLM(
            model=model_path,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            dtype=dtype,
            # False: CUDA graphs captured (reloads copy weights in place, so they stay
            # valid); without CUDA (the CPU build) always eager: there the graphs'
            # stand-in is a slow torch.compile of the model
            enforce_eager=enforce_eager or not torch.cuda.is_available(),
        )
        if enable_sleep_mode:
            self.llm.sleep(level=1)

    def _push(self, weights) -> None:
        model_runner(self.llm).reload_weights(weights_iterator=weights)

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


