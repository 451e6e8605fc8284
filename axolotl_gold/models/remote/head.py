"""A teacher's output head read alone from its checkpoint (the ``lm_head`` tensors, or the
tied input embeddings), never the whole model: what the trainer holds of a teacher that runs
in a teacher server (``teacher.RemoteTeacher``)."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.models.compatibility import text_config

LOG = logging.getLogger(__name__)



def load_output_head(model: str, revision: str | None, dtype: torch.dtype, device) -> tuple[object, nn.Linear]:
    """(the teacher's config, its output head) read from ``model`` without loading the model:
    the ``lm_head`` tensors, or the input embeddings when they are tied. Falls back to loading
    the whole model on the CPU (and keeping its head) when the checkpoint has no safetensors."""
    from transformers import AutoConfig

    from axolotl_gold.models.teacher import auto_model_class

    config = AutoConfig.from_pretrained(model, revision=revision)
    with torch.device("meta"):
        skeleton = auto_model_class(config).from_config(config)
    head = skeleton.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise GoldConfigError(
            f"`teacher_model: {model}`: its output head is a {type(head).__name__}, not an "
            "nn.Linear; the teacher server cannot serve it yet (remove `teacher_server_url`)."
        )
    tied = bool(getattr(text_config(config), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    weight_names = _names(skeleton, head.weight)
    if tied:
        weight_names += [n for n in _names(skeleton, skeleton.get_input_embeddings().weight) if n not in weight_names]
    bias_names = _names(skeleton, head.bias) if head.bias is not None else []
    tensors = _read_tensors(model, revision, weight_names, bias_names)
    if tensors is None:
        LOG.warning("teacher %s: no safetensors tensor for its head; loading the whole model on the CPU once", model)
        full = auto_model_class(config).from_pretrained(model, revision=revision, dtype=dtype)
        full_head = full.get_output_embeddings()
        weight, bias = full_head.weight.detach(), None if full_head.bias is None else full_head.bias.detach()
        del full
    else:
        weight, bias = tensors
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.to(device, dtype).contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.to(device, dtype).contiguous(), requires_grad=False)
    return config, out


def _names(module: nn.Module, param) -> list[str]:
    return [n for n, p in module.named_parameters(remove_duplicate=False) if p is param]


def _candidates(names: list[str]) -> list[str]:
    out = []
    for name in names:
        for variant in (name, name.removeprefix("model."), f"model.{name}"):
            if variant not in out:
                out.append(variant)
    return out


def _read_tensors(model: str, revision, weight_names, bias_names):
    """(weight, bias) from the checkpoint's safetensors, or None when it has none."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(name):
        return cached_file(model, name, revision=revision, _raise_exceptions_for_missing_entries=False)

    index = fetch("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    else:
        single = fetch("model.safetensors")
        if single is None:
            return None
        with safe_open(single, framework="pt") as f:
            weight_map = {k: os.path.basename(single) for k in f.keys()}

    def find(names, kind):
        for key in _candidates(names):
            if key in weight_map:
                return key
        suffix = ".".join(names[0].split(".")[-2:]) if names else kind
        matches = [k for k in weight_map if k.endswith(suffix)]
        return matches[0] if len(matches) == 1 else None

    def read(key):
        path = fetch(weight_map[key])
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)

    weight_key = find(weight_names, "lm_head.weight")
    if weight_key is None:
        return None
    bias_key = find(bias_names, "lm_head.bias") if bias_names else None
    if bias_names and bias_key is None:
        return None
    return read(weight_key), (read(bias_key) if bias_key else None)
