"""Loading the teacher: once, frozen, in eval mode, never saved with the student."""

from __future__ import annotations

import logging

import torch
from torch import nn

from axolotl_gold.models.isolation import (
    modeling_modules,
    original_modeling,
    record_modules,
    restore_original_attributes,
)

LOG = logging.getLogger(__name__)

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


def model_classes(config) -> list[type]:
    """The classes that build a model of ``config``: its own and its sub-models'."""
    from transformers import AutoModel

    classes = []
    mapping = auto_model_class(config)._model_mapping
    if type(config) in mapping:
        classes.append(mapping[type(config)])
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and type(sub) in AutoModel._model_mapping:
            classes.append(AutoModel._model_mapping[type(sub)])
    return classes


def record_teacher_modeling(cfg) -> list[str]:
    """Record the teacher's modeling modules before Axolotl patches them for the student.

    Call it before any model loads (the plugin's ``register``); see ``isolation``.
    Best effort: a teacher that cannot be resolved yet is reported by ``pre_model_load``.
    Returns the modules recorded.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg["teacher_model"], revision=cfg.get("teacher_model_revision"))
        return record_modules(modeling_modules(model_classes(config)))
    except Exception as err:  # noqa: BLE001 - any failure here is reported later, with advice
        LOG.debug("teacher modeling code not recorded: %s", err)
        return []


def load_teacher(cfg, device: torch.device) -> nn.Module:
    """The teacher of ``cfg.teacher_model`` on ``device``, with no gradients.

    Built and run from its modeling code as recorded by ``record_teacher_modeling``
    (when it was), not as Axolotl has patched it for the student since.
    """
    from transformers import AutoConfig

    kwargs = dict(cfg.get("teacher_model_init_kwargs") or {})
    kwargs.pop("torch_dtype", None)
    kwargs["dtype"] = teacher_dtype(cfg)
    if cfg.get("teacher_model_revision"):
        kwargs["revision"] = cfg["teacher_model_revision"]
    config = AutoConfig.from_pretrained(cfg["teacher_model"], revision=kwargs.get("revision"))
    with original_modeling():
        teacher = auto_model_class(config).from_pretrained(cfg["teacher_model"], **kwargs)
    restored = restore_original_attributes(teacher)
    if restored:
        LOG.info("teacher: unpatched %s (Axolotl patched them for the student)", restored)
    teacher.requires_grad_(False)
    teacher.eval()
    disable_dropout(teacher)
    return teacher.to(device)
