"""What the two vLLM engines share: the student they sample for, and when its weights go.

A vLLM engine starts from the base checkpoint, which is not the student once training
has begun (nor before, when an adapter is resumed from ``lora_model_dir``, when
``modules_to_save`` differ, or when a QLoRA student computes with its dequantized 4-bit
base). So the student's weights (``weights.student_weights``: all of them for a full
fine-tune, only what an adapter changes otherwise) are pushed before the run's first
window and then every ``sync_every`` optimizer steps. How they are pushed is each
engine's own (``_push``): reloaded in this process, or posted to the rollout server.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.vllm.weights import student_weights


class SyncedEngine:
    """Sampling settings, stop ids, counters, and the weight-sync schedule."""

    def __init__(
        self,
        get_model: Callable[[], torch.nn.Module],
        get_step: Callable[[], int],
        sampling: SamplingSettings,
        eos_ids: set[int],
        sync_every: int = 1,
        min_new_tokens: int = 0,
    ):
        self.get_model = get_model
        self.get_step = get_step
        self.sampling = sampling
        self.eos_ids = set(eos_ids)
        self.sync_every = max(1, sync_every)
        self.min_new_tokens = min_new_tokens
        self.calls = 0
        self.syncs = 0
        self.sync_seconds = 0.0
        self.dropped = 0  # completions dropped for non-finite log-probabilities
        self._synced_step: int | None = None  # None: the base checkpoint, not yet the student

    def _push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def sync_weights(self) -> None:
        """Push the student's current weights (an adapter: only the modules it changes)."""
        start = time.perf_counter()
        self._push(student_weights(self.get_model(), first=self._synced_step is None))
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - start

    def _sync_now(self) -> None:
        self.sync_weights()

    def _maybe_sync(self) -> None:
        step = self.get_step()
        if self._synced_step is None or step - self._synced_step >= self.sync_every:
            self._sync_now()
            self._synced_step = step
