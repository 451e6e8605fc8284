"""Client of the vLLM rollout server (``vllm_mode: server``, see ``axolotl_gold.rollouts.vllm.server``)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings, refuse_model_inputs
from axolotl_gold.rollouts.vllm.synced import SyncedEngine


class VLLMServerUnreachable(RuntimeError):
    pass


class VLLMServerEngine(SyncedEngine):
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
        super().__init__(get_model, get_step, sampling, eos_ids, sync_every, min_new_tokens)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = max(1, retries)
        self.is_main_process = is_main_process

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

    def _push(self, weights) -> None:
        from safetensors.torch import save

        tensors = {name: t.contiguous().cpu() for name, t in weights}
        self._post("/update_weights", data=save(tensors))

    def _sync_now(self) -> None:
        """The main process pushes; every process waits until the server has the weights."""
        if self.is_main_process:
            self.sync_weights()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

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
