"""Which engine samples a run's rollouts, built from the settings.

``static`` (static KV cache, CUDA-graph decode) is the default on CUDA for text
students, FSDP2's and ZeRO-3's gathered ones included (their hooks are off for the call;
on one H200 under FSDP2: 3.5 ms per token step against HF ``generate``'s 20); under
``auto``, image prompts (the static engine serves them when asked for) go through HF
``generate``, and so does ZeRO-3's ``seq_kd`` teacher whatever the setting (it gathers
its shards in its forwards while it samples); ``use_vllm`` selects a
colocated engine or the rollout server's client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.rollouts.engines.base import RolloutEngine, SamplingSettings
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.rollouts.engines.static import StaticCacheEngine


def select_engine(name: str, device: torch.device, images: bool = False):
    """The local engine class for ``gold_generation_engine: name``."""
    if name == "static" or (name == "auto" and device.type == "cuda" and not images):
        return StaticCacheEngine
    return HFGenerateEngine


def sampling_settings(settings: GoldSettings) -> SamplingSettings:
    return SamplingSettings(
        max_new_tokens=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
    )


@dataclass
class EngineContext:
    """What engines read from the running trainer: models and step, read at call time."""

    get_student: Callable[[], torch.nn.Module]
    get_teacher: Callable[[], torch.nn.Module]
    get_step: Callable[[], int]
    device: torch.device
    num_processes: int = 1
    is_main_process: bool = True
    suppress_tokens: list[int] | None = None  # image tokens a VLM must never sample
    # the teacher's forwards gather its shards module by module while it samples (ZeRO-3's
    # inference engine), so every process must run as many of them as the others
    teacher_samples_in_lockstep: bool = False


def _no_lockstep(kwargs: dict) -> dict:
    """``kwargs`` with ``generate``'s ``synced_gpus`` off: transformers turns it on for any
    ZeRO-3 / FSDP model (an all-reduce and a host sync every token, and a process whose rows
    stopped decoding on until every process's have), which only a model that gathers its
    shards in its forward needs; ours sample from weights gathered for the whole call."""
    return {**kwargs, "generate_kwargs": {**kwargs.get("generate_kwargs", {}), "synced_gpus": False}}


def build_engines(
    settings: GoldSettings, ctx: EngineContext, pad_id: int, stop_ids: set[int]
) -> tuple[RolloutEngine, RolloutEngine | None]:
    """(the student's engine, the teacher's engine for ``seq_kd`` or None)."""
    sampling = sampling_settings(settings)
    local = select_engine(settings.generation_engine, ctx.device, images=settings.vision)
    kwargs = {"generate_kwargs": {"suppress_tokens": ctx.suppress_tokens}} if ctx.suppress_tokens else {}
    if settings.generation_rows:
        kwargs["batch_size"] = settings.generation_rows
    vllm = settings.vllm
    if vllm.enabled and vllm.mode == "server":
        from axolotl_gold.rollouts.vllm.client import VLLMServerEngine

        student = VLLMServerEngine(
            vllm.server_url,
            get_model=ctx.get_student,
            get_step=ctx.get_step,
            sampling=sampling,
            eos_ids=stop_ids,
            timeout=vllm.server_timeout,
            sync_every=vllm.sync_steps,
            is_main_process=ctx.is_main_process,
        )
    elif vllm.enabled:
        if ctx.num_processes > 1:
            raise GoldConfigError(
                "`vllm_mode: colocate` runs one engine per process and is verified for a "
                "single training process only: use `vllm_mode: server` for several "
                "processes, or train with one process."
            )
        from axolotl_gold.rollouts.vllm.colocate import VLLMColocateEngine

        student = VLLMColocateEngine(
            settings.student_path,
            get_model=ctx.get_student,
            get_step=ctx.get_step,
            sampling=sampling,
            eos_ids=stop_ids,
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            tensor_parallel_size=vllm.tensor_parallel_size,
            max_model_len=vllm.max_model_len,
            enable_sleep_mode=vllm.enable_sleep_mode,
            sync_every=vllm.sync_steps,
            dtype=vllm.dtype,
            enforce_eager=vllm.enforce_eager,
        )
    else:
        if local is StaticCacheEngine:
            kwargs["compile_decode"] = settings.rollout_compile
            kwargs["fuse_projections"] = settings.rollout_fuse_projections
        student = local(ctx.get_student, sampling, pad_id, stop_ids, **_no_lockstep(kwargs))
    teacher = None
    if settings.seq_kd and ctx.teacher_samples_in_lockstep:
        # ZeRO-3's teacher gathers its shards in its forwards while it samples (collectives
        # that no CUDA graph may capture): HF generate, every process in step
        kwargs.pop("compile_decode", None)
        kwargs.pop("fuse_projections", None)
        teacher = HFGenerateEngine(ctx.get_teacher, sampling, pad_id, stop_ids, **kwargs)
    elif settings.seq_kd:  # the student's engine alone fuses projections (the copies' memory)
        kwargs.pop("fuse_projections", None)
        teacher = local(ctx.get_teacher, sampling, pad_id, stop_ids, **_no_lockstep(kwargs))
    return student, teacher
