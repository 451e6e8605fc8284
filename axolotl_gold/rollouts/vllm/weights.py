"""What a weight sync pushes to a vLLM engine: the student's tensors under the base
checkpoint's names.

- A full fine-tune: every weight.
- A peft adapter (LoRA, DoRA, QLoRA): only what differs from the base checkpoint the
  engine started from, merged with peft's own merge logic (``W + s B A``; DoRA's
  magnitude rescaling; a 4-bit or 8-bit bitsandbytes base dequantized first):
  the LoRA modules, their fused siblings in vLLM, the trained copies of
  ``modules_to_save`` (``embed_tokens``, ``lm_head``) and ``trainable_token_indices``
  rows. The *first* sync of a run also pushes every quantized base module (a QLoRA
  student computes with the dequantized 4-bit weights, not the checkpoint's), so the
  engine samples from the student as it computes, not from the checkpoint.
"""

from __future__ import annotations

from typing import Iterator

import torch

# vLLM stores these projections fused in one parameter; reloading one shard alone
# leaves the others undefined (NaN on the CPU build), so a group is pushed whole
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def is_quantized(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit weight (``Params4bit`` / ``Int8Params``)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def base_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as it computes with it (bitsandbytes: dequantized)."""
    if is_quantized(module):
        # peft's dequantization (its merge uses it); not ``dequantize_module_weight``,
        # which on the CPU reassigns ``module.weight`` (re-packing bitsandbytes' CPU layout)
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
    return module.weight


def merged_lora_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a peft LoRA layer with its active adapters merged, the base left
    untouched: peft's own merge (``merge(safe_merge=True)``) on a copy of the base weight
    (vanilla LoRA: ``W + get_delta_weight``; a variant such as DoRA: its ``merge_safe``,
    which applies the magnitude vector)."""
    base = module.get_base_layer()
    weight = base_weight(base).detach().clone()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return weight, bias  # already in the base weight, or switched off
    dtype = weight.dtype
    for adapter in module.active_adapters:
        if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
            continue
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is None:
            weight = weight + module.get_delta_weight(adapter).to(dtype)
        else:
            weight = variant.merge_safe(module, adapter, weight).to(dtype)
        if getattr(module, "lora_bias", {}).get(adapter):
            if bias is None:  # peft's merge refuses it too: the engine has no bias to hold it
                raise ValueError(
                    f"`lora_bias` on {type(base).__name__} without a bias cannot be pushed to vLLM "
                    "(its checkpoint has no bias there): target modules with a bias, or drop `lora_bias`."
                )
            bias = bias + module.lora_B[adapter].bias * module.scaling[adapter]
    return weight, bias


def adapter_weights(model: torch.nn.Module, first: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of what a peft student changes, merged; see the module
    docstring. ``first``: the run's first sync (quantized base modules too)."""
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    modules = dict(model.named_modules())
    inside_wrappers = set()
    wanted: list[str] = []
    for name, module in modules.items():
        if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
            wanted.append(name)
            inside_wrappers.update(n for n in modules if n.startswith(name + "."))
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in _FUSED_GROUPS if leaf in g), (leaf,))
            wanted += [f"{parent}.{sibling}" for sibling in group if f"{parent}.{sibling}" in modules]
            inside_wrappers.update(n for n in modules if n.startswith(name + "."))
    if first:  # a QLoRA student computes with its dequantized base, not the checkpoint's
        wanted += [n for n, m in modules.items() if is_quantized(m) and n not in inside_wrappers]
    with torch.no_grad():
        for name in dict.fromkeys(wanted):
            yield from _module_tensors(name, modules[name])


def _module_tensors(name: str, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    prefix = _checkpoint_name(name)
    if isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters
        source = module.modules_to_save[active[0]] if active and not module.disable_adapters else module.original_module
        for key, tensor in source.named_parameters():
            yield f"{prefix}.{key}", tensor.detach()
        return
    if isinstance(module, TrainableTokensWrapper):
        layer = module.token_adapter
        active = [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]
        weight = layer.get_merged_weights(active) if active and not layer.disable_adapters else layer.base_layer.weight
        yield f"{prefix}.weight", weight.detach()
        return
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        weight, bias = merged_lora_weight(module)
    else:
        module = getattr(module, "base_layer", module)
        weight, bias = base_weight(module).detach(), getattr(module, "bias", None)
    yield f"{prefix}.weight", weight
    if bias is not None:
        yield f"{prefix}.bias", bias.detach()


# kept for callers of the LoRA-only name
def lora_merged_weights(model: torch.nn.Module, first: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    return adapter_weights(model, first)


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in model.state_dict().items():
        yield _checkpoint_name(name), tensor.detach()


def _checkpoint_name(name: str) -> str:
    for prefix in ("base_model.model.", "module."):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "")


def is_adapter_model(model: torch.nn.Module) -> bool:
    """A peft student: LoRA layers, ``modules_to_save`` or trainable token wrappers."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft is a dependency of axolotl
        AuxiliaryTrainingWrapper = ()
    return any(hasattr(m, "lora_A") or isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())


def student_weights(model: torch.nn.Module, first: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """What a sync pushes: an adapter's merged changes (``first``: and the quantized
    base modules), or every weight of a full fine-tune."""
    return adapter_weights(model, first) if is_adapter_model(model) else full_weights(model)
