"""HF ``generate`` on the unwrapped student (or teacher, for ``seq_kd``)."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from axolotl_gold.data.batching import left_pad
from axolotl_gold.rollouts.engines.base import SamplingSettings, trim_completion


def _to_model(value, param: torch.Tensor):
    """On the model's device; floating tensors (pixel values) in its dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(param.device, dtype=param.dtype)
    return value.to(param.device)


@contextlib.contextmanager
def generation_mode(model):
    """Eval mode with the KV cache on, then restore.

    Gradient checkpointing is left as the user set it: HF layers checkpoint only in
    training mode, so eval mode alone turns it off. (Disabling and re-enabling it
    every window added an input hook each time and replaced the user's
    ``gradient_checkpointing_kwargs``.)
    """
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True
    model.eval()
    try:
        yield model
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


_UNSET = object()


@contextlib.contextmanager
def plain_generation_config(model):
    """``generate`` reads only our sampling settings, not the checkpoint's extras.

    HF fills every setting left unset from ``model.generation_config``: a checkpoint's
    ``repetition_penalty``, ``min_p``, ``no_repeat_ngram_size``... would make the
    rollouts something other than samples of the student's policy (and differ from
    the static engine and vLLM). A blank config is swapped in on the model and on
    every wrapped model inside it (peft copies its own onto the base model).
    """
    from transformers import GenerationConfig

    holders = [model] + [m for m in model.modules() if m is not model and "generation_config" in vars(m)]
    saved = [(m, vars(m).get("generation_config", _UNSET)) for m in holders]
    for m, _ in saved:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, value in saved:
            if value is _UNSET:
                vars(m).pop("generation_config", None)
            else:
                m.generation_config = value


class HFGenerateEngine:
    """Batched ``model.generate`` over all of a window's on-policy prompts.

    ``get_model`` returns the model to sample from at call time (the unwrapped
    student, whose weights are the ones being trained). ``min_new_tokens`` suppresses
    EOS before that many tokens (benchmarks force fixed-length rollouts with it);
    ``generate_kwargs`` are passed on to ``generate`` as they are (for example
    ``{"cache_implementation": "static"}``, which lets HF compile the decode step).
    """

    def __init__(
        self,
        get_model: Callable[[], torch.nn.Module],
        sampling: SamplingSettings,
        pad_id: int,
        eos_ids: set[int],
        batch_size: int | None = None,
        min_new_tokens: int = 0,
        generate_kwargs: dict | None = None,
    ):
        self.get_model = get_model
        self.sampling = sampling
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)
        self.batch_size = batch_size
        self.min_new_tokens = min_new_tokens
        self.generate_kwargs = dict(generate_kwargs or {})
        self.calls = 0

    def _kwargs(self) -> dict:
        s = self.sampling
        kwargs = {
            "max_new_tokens": s.max_new_tokens,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids),
        }
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        kwargs.update(self.generate_kwargs)
        return kwargs

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], seed: int, model_inputs: dict | None = None
    ) -> list[list[int]]:
        self.calls += 1
        if not prompts:
            return []
        model = self.get_model()
        with generation_mode(model):
            return self._sample(model, prompts, seed, model_inputs)

    def _sample(self, model, prompts, seed, model_inputs) -> list[list[int]]:
        param = next(model.parameters())
        device = param.device
        step = self.batch_size or len(prompts)
        out: list[list[int]] = []
        devices = [device] if device.type == "cuda" else []
        with plain_generation_config(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if model_inputs is not None:  # prompts with images: one processor batch
                inputs = {k: _to_model(v, param) for k, v in model_inputs.items()}
                sequences = model.generate(**inputs, **self._kwargs())
                new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
                return [trim_completion(t, self.eos_ids) for t in new_tokens]
            for start in range(0, len(prompts), step):
                chunk = prompts[start : start + step]
                ids, mask = left_pad(chunk, self.pad_id)
                sequences = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), **self._kwargs()
                )
                new_tokens = sequences[:, ids.shape[1]:].tolist()
                out.extend(trim_completion(t, self.eos_ids) for t in new_tokens)
        return out
