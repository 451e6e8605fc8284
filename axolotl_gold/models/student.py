"""The student as Axolotl loaded it: what GOLD adjusts before training."""

from __future__ import annotations

import logging

import torch
from torch import nn

LOG = logging.getLogger(__name__)


def float32_master_weights(cfg, model) -> int:
    """``fp16: true`` full fine-tune: the trainable weights in float32, as AMP requires.

    Axolotl loads the model in float16 for ``fp16: true``; mixed-precision training then
    stops at its first optimizer step ("Attempting to unscale FP16 gradients", Axolotl
    issue #1031). float32 weights under float16 autocast is the AMP recipe (the forward
    still computes in float16). Adapters (their own weights are float32) and DeepSpeed /
    FSDP (their own fp16 handling) are left alone. Returns the tensors converted.
    """
    if not cfg.get("fp16") or cfg.get("adapter") or cfg.get("deepspeed") or cfg.get("fsdp_config"):
        return 0
    converted = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
            converted += 1
    if converted:
        LOG.info("gold: %d float16 trainable tensors held in float32 for fp16 mixed precision", converted)
    return converted


def place_cpu_processes_on_cpu(cfg) -> None:
    """Multi-process runs without an accelerator: load models on the CPU.

    Axolotl 0.19 maps every multi-process run to ``{"": LOCAL_RANK}``, a GPU index,
    which fails on a CPU-only machine (DDP over gloo). This hook runs after Axolotl
    normalizes the config and before any model loads.
    """
    if (cfg.get("world_size") or 1) > 1 and str(cfg.get("device", "cpu")) == "cpu" and not torch.cuda.is_available():
        cfg.device_map = {"": "cpu"}


def disable_dropout(model: nn.Module) -> None:
    """Deterministic scoring and training: dropout would make the target noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
