"""Loading the teacher: once, frozen, in eval mode, never saved with the student."""

from __future__ import annotations

import logging

import torch
from torch import nn

from axolotl_gold.config.settings import TeacherSettings
from axolotl_gold.models.isolation import (
    modeling_modules,
    original_modeling,
    record_modules,
    restore_original_attributes,
)
from axolotl_gold.models.student import disable_dropout
from axolotl_gold.vision.setup import is_vision_config

LOG = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def auto_model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


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


def load_teacher(teacher: TeacherSettings, device: torch.device | None, *, meta: bool = False) -> nn.Module:
    """The teacher on ``device`` (None: left where ``from_pretrained`` put it, the CPU),
    with no gradients.

    ``meta``: built from its config on the ``meta`` device, no weights read (FSDP2's
    ranks other than 0: ``shard_teacher`` fills their shards from rank 0).
    Built and run from its modeling code as recorded by ``record_teacher_modeling``
    (when it was), not as Axolotl has patched it for the student since.
    """
    from transformers import AutoConfig

    kwargs = dict(teacher.init_kwargs)
    kwargs.pop("torch_dtype", None)
    kwargs["dtype"] = _DTYPES[teacher.dtype]
    if teacher.revision:
        kwargs["revision"] = teacher.revision
    config = AutoConfig.from_pretrained(teacher.model, revision=teacher.revision)
    with original_modeling():
        if meta:
            keep = ("attn_implementation", "trust_remote_code")
            config_kwargs = {k: v for k, v in kwargs.items() if k in keep}
            with torch.device("meta"):
                model = auto_model_class(config).from_config(config, dtype=kwargs["dtype"], **config_kwargs)
        else:
            model = auto_model_class(config).from_pretrained(teacher.model, **kwargs)
    restored = restore_original_attributes(model)
    if restored:
        LOG.info("teacher: unpatched %s (Axolotl patched them for the student)", restored)
    model.requires_grad_(False)
    model.eval()
    disable_dropout(model)
    return model if device is None or meta else model.to(device)
