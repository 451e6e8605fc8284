"""Client of the vLLM rollout server (``vllm_mode: server``, see ``axolotl_gold.rollouts.vllm.server``)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings, refuse_model_inputs
from axolotl_gold.rollouts.vllm.weights import student_weights


class VLLMServerUnreachable(RuntimeError):
    pass


class VLLMServerEngine:
    """Same contract as the other engines; weights go over HTTP before the first window
    (the server starts from the base checkpoint) and after optimizer steps.

    With several training processes, the main process pushes the weights and every
    process waits at a barrier before sampling, so no rank samples stale weights.
    """

    def __init__(
        self,
        base_url: str,
        get_model: Callable[[], torch.nn.Module],
        get_step: Callable[[], int],
        sampling: SamplingSettings,
        eos_ids: set[int],
        timeout: float = 240.0,
        retries: int = 3,
        sync_every: int = 1,
        is_main_process: bool = True,
        min_new_tokens: int = 0,
    ):
        self.base_url = base_url.rstrip("/")
        self.get_model = get_model
        self.get_step = get_step
        self.sampling = sampling
        self.eos_ids = set(eos_ids)
        self.timeout = timeout
        self.retries = max(1, retries)
        self.sync_every = max(1, sync_every)
        self.is_main_process = is_main_process
        self.min_new_tokens = min_new_tokens
        self.calls = 0
        self.syncs = 0
        self.sync_seconds = 0.0
        self.dropped = 0
        self._synced_step: int | None = None  # the server starts from the base checkpoint

    def _post(self, path: str, **kwargs):
        import requests

        url = f"{self.base_url}{path}"
        last = None
        for attempt in range(self.retries):
            try:
                response = requests.post(url, timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as err:
                last = err
                time.sleep(min(2.0**attempt, 10.0))
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                time.sleep(min(2.0**attempt, 10.0))
                continue
            if not response.ok:  # the request itself is wrong: retrying cannot help
                raise RuntimeError(f"vLLM server {url}: HTTP {response.status_code}: {response.text[:500]}")
            return response.json()
        raise VLLMServerUnreachable(
            f"the vLLM server at {self.base_url} did not answer {path} after {self.retries} "
            f"tries ({last}). Start it with `python -m axolotl_gold.rollouts.vllm.server --model "
            "<base_model> --port <port>` or fix `vllm_server_host` / `vllm_server_port`."
        )

    def sync_weights(self) -> None:
        from safetensors.torch import save

        start = time.perf_counter()
        first = self._synced_step is None
        tensors = {name: t.contiguous().cpu() for name, t in student_weights(self.get_model(), first=first)}
        self._post("/update_weights", data=save(tensors))
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - start

    def _maybe_sync(self) -> None:
        step = self.get_step()
        if self._synced_step is not None and step - self._synced_step < self.sync_every:
            return
        if self.is_main_process:
            self.sync_weights()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        self._synced_step = step

    def generate(
        self, prompts: list[list[int]], seed: int, model_inputs: dict | None = None
    ) -> list[list[int]]:
        refuse_model_inputs(self, model_inputs)
        self.calls += 1
        if not prompts:
            return []
        self._maybe_sync()
        s = self.sampling
        answer = self._post(
            "/generate",
            json={
                "prompts": [list(map(int, p)) for p in prompts],
                "seed": int(seed % 2**31),
                "max_tokens": s.max_new_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,
                "min_tokens": self.min_new_tokens,
                "eos_ids": sorted(self.eos_ids),
            },
        )
        self.dropped += int(answer.get("dropped", 0))
        return answer["completions"]
