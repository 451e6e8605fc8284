"""Distillation losses: pure torch, no axolotl import."""

from axolotl_gold.losses.chunked import chunked_jsd_loss_sum
from axolotl_gold.losses.fused import fused_jsd_loss_sum
from axolotl_gold.losses.jsd import generalized_jsd_loss, generalized_jsd_token_loss
from axolotl_gold.losses.topk_tail import topk_tail_loss_sum, topk_tail_token_loss

__all__ = [
    "chunked_jsd_loss_sum",
    "fused_jsd_loss_sum",
    "generalized_jsd_loss",
    "generalized_jsd_token_loss",
    "topk_tail_loss_sum",
    "topk_tail_token_loss",
]
