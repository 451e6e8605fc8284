"""What a weight sync pushes to a vLLM engine: the student's tensors under the base
checkpoint's names (a full fine-tune: every weight; LoRA: only the modules it changes,
merged as ``W + scale * B @ A``)."""

from __future__ import annotations

from typing import Iterator

import torch

# vLLM stores these projections fused in one parameter; reloading one shard alone
# leaves the others undefined (NaN on the CPU build), so a group is pushed whole
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def lora_merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, weight) of the modules LoRA changes, merged (``W + B A s``).

    Names are the base checkpoint's (``model.layers.0.self_attn.q_proj.weight``), as
    vLLM's loader expects. A module fused with others in vLLM (q/k/v, gate/up) brings
    its siblings and their biases along; every other module is left out.
    """
    modules = dict(model.named_modules())
    wanted: list[str] = []
    for name, module in modules.items():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in _FUSED_GROUPS if leaf in g), (leaf,))
            wanted += [f"{parent}.{sibling}" for sibling in group if f"{parent}.{sibling}" in modules]
    for name in dict.fromkeys(wanted):
        module = modules[name]
        base = getattr(module, "base_layer", module)
        weight = base.weight
        if hasattr(module, "lora_A"):
            weight = weight + module.get_delta_weight("default")
        yield _checkpoint_name(name) + ".weight", weight.detach()
        if base.bias is not None:
            yield _checkpoint_name(name) + ".bias", base.bias.detach()


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in model.state_dict().items():
        yield _checkpoint_name(name), tensor.detach()


def _checkpoint_name(name: str) -> str:
    for prefix in ("base_model.model.", "module."):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "")


def student_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What a sync pushes: LoRA's merged changed modules, or every weight."""
    is_lora = any(hasattr(m, "lora_A") for m in model.modules())
    return lora_merged_weights(model) if is_lora else full_weights(model)
