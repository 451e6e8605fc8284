"""Loading the teacher: once, frozen, in eval mode, never saved with the student."""

from __future__ import annotations

import torch
from torch import nn

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def disable_dropout(model: nn.Module) -> None:
    """Deterministic scoring and training: dropout would make the target noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def is_vision_config(config) -> bool:
    """A vision-language model's config (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def auto_model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def teacher_dtype(cfg) -> torch.dtype:
    kwargs = cfg.get("teacher_model_init_kwargs") or {}
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    if isinstance(dtype, str) and dtype != "auto":
        return _DTYPES[dtype]
    if cfg.get("bf16") in (True, "auto") and torch.cuda.is_available():
        return torch.bfloat16
    if cfg.get("fp16"):
        return torch.float16
    return torch.float32


def load_teacher(cfg, device: torch.device) -> nn.Module:
    """The teacher of ``cfg.teacher_model`` on ``device``, with no gradients."""
    from transformers import AutoConfig

    kwargs = dict(cfg.get("teacher_model_init_kwargs") or {})
    kwargs.pop("torch_dtype", None)
    kwargs["dtype"] = teacher_dtype(cfg)
    if cfg.get("teacher_model_revision"):
        kwargs["revision"] = cfg["teacher_model_revision"]
    config = AutoConfig.from_pretrained(cfg["teacher_model"], revision=kwargs.get("revision"))
    teacher = auto_model_class(config).from_pretrained(cfg["teacher_model"], **kwargs)
    teacher.requires_grad_(False)
    teacher.eval()
    disable_dropout(teacher)
    return teacher.to(device)
