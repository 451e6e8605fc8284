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


PLACEMENT_KEYS = ("quantization_config", "device_map", "load_in_4bit", "load_in_8bit")


def placed_by_loader(init_kwargs: dict) -> bool:
    """``teacher_model_init_kwargs`` that place the teacher themselves: a bitsandbytes
    quantization (``quantization_config``, or ``load_in_4bit`` / ``load_in_8bit``) or a
    ``device_map``. Such a teacher is never moved with ``.to(device)`` afterwards."""
    return any(init_kwargs.get(key) for key in PLACEMENT_KEYS)


def placement_kwargs(kwargs: dict, device: torch.device | None) -> dict:
    """``from_pretrained`` kwargs with the placement filled in.

    ``load_in_4bit`` / ``load_in_8bit`` become a ``quantization_config`` (transformers 5
    takes only that); a quantized teacher without a ``device_map`` is loaded straight
    onto ``device`` (``{"": device}``), so its weights are quantized as they arrive and
    never exist in full precision on the device. bitsandbytes leaves the output head
    (``lm_head``) unquantized unless ``llm_int8_skip_modules`` says otherwise, so the
    fused losses still apply it themselves (see ``scoring.forward.bypassable_head``).
    """
    kwargs = dict(kwargs)
    bits = {k: bool(kwargs.pop(k)) for k in ("load_in_4bit", "load_in_8bit") if k in kwargs}
    if any(bits.values()) and not kwargs.get("quantization_config"):
        kwargs["quantization_config"] = dict(bits)
    quantization = kwargs.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("load_in_4bit"):
        # 4-bit layers compute in float32 unless told: compute in the teacher's dtype
        dtype = kwargs.get("dtype")
        name = str(dtype).removeprefix("torch.") if dtype is not None else None
        kwargs["quantization_config"] = {"bnb_4bit_compute_dtype": name, **quantization} if name else quantization
    if kwargs.get("quantization_config") and not kwargs.get("device_map") and device is not None:
        kwargs["device_map"] = {"": str(device)}
    return kwargs


def load_teacher(teacher: TeacherSettings, device: torch.device | None, *, meta: bool = False) -> nn.Module:
    """The teacher on ``device`` (None: left where ``from_pretrained`` put it, the CPU),
    with no gradients.

    A quantized teacher (bitsandbytes 8-bit / 4-bit through ``teacher_model_init_kwargs``)
    or one with a ``device_map`` stays where ``from_pretrained`` placed it
    (``placement_kwargs``): no ``.to(device)`` undoes it.

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
    placed = placed_by_loader(kwargs) and not meta
    if placed:
        kwargs = placement_kwargs(kwargs, device)
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
    if placed:
        LOG.info("teacher placed by from_pretrained (%s): not moved", _describe_placement(model))
        return model
    return model if device is None or meta else model.to(device)


def _describe_placement(model: nn.Module) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    quantized = getattr(model, "hf_quantizer", None)
    return f"devices {devices}" + (f", {type(quantized).__name__}" if quantized is not None else "")
