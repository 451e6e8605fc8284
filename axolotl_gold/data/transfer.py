"""A window's scoring batches onto the device without the host waiting for it.

A blocking copy from ordinary (pageable) host memory returns only once the device has run
everything queued before it: HF's ``Trainer._prepare_inputs`` moved each micro-batch's tensors
that way, one wait per tensor, each draining the queue between the last micro-step's backward
and the next forward (through ``axolotl train``: 25 waits a step at 4 micro-batches). Copied
here once a window, from page-locked memory with ``non_blocking``, the copies queue behind the
device's work and HF's move finds the tensors already there.
"""

from __future__ import annotations

import torch


def to_device(value, device: torch.device | str):
    """``value`` with every tensor in it (through dicts, lists and tuples) on ``device``. To a
    CUDA device a host tensor is first copied to page-locked memory (which the allocator keeps
    until the copy has run), then copied with ``non_blocking``: no wait on the device."""
    device = torch.device(device)
    if isinstance(value, torch.Tensor):
        if device.type == "cuda" and value.device.type == "cpu":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)  # itself when it is there already
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value
