"""A loss and the flat gradient it gives a model's parameters, for equality tests."""

from __future__ import annotations

import torch


def loss_and_grad(model: torch.nn.Module, score) -> tuple[float, torch.Tensor]:
    """``score()`` (a scalar loss of ``model``) and the gradient of its parameters, flattened."""
    model.zero_grad()
    value = score()
    value.backward()
    return float(value), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
