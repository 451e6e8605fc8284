"""Full state dicts for saving, and resuming a LoRA student from a FULL_STATE_DICT checkpoint."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn


def full_state_dict(model: nn.Module, *, cpu_offload: bool = True, ignore_frozen_params: bool = False) -> dict:
    """The whole model's state dict, gathered (collective: call it on every process).

    With ``cpu_offload`` (default) only rank 0 gets the tensors (on the CPU), the other
    ranks an empty dict; keys are the unwrapped model's (FSDP2 keeps FQNs), so rank 0 can
    ``save_pretrained(dir, state_dict=sd)``. ``ignore_frozen_params`` keeps the trainable
    tensors only (a LoRA adapter's, with peft's key names still to be mapped by peft's
    ``get_peft_model_state_dict``). This is what Accelerate's ``get_state_dict`` does for
    FSDP2 with ``fsdp_state_dict_type: FULL_STATE_DICT``, which the HF trainer's
    ``save_model`` (and so Axolotl) already calls: the trainer needs nothing more to
    save a sharded student; this function is for plain loops and checks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=cpu_offload, ignore_frozen_params=ignore_frozen_params
    )
    return get_model_state_dict(model, options=options)


def load_full_adapter_checkpoint(accelerator, model: nn.Module, checkpoint_dir: str) -> bool:
    """Resume a LoRA student from an FSDP2 ``FULL_STATE_DICT`` checkpoint; False (nothing
    done) for any other case, which Accelerate's ``load_fsdp_model`` handles.

    Accelerate 1.13 gets this case wrong both ways: its ``pytorch_model_fsdp.bin`` holds
    the adapter as peft's state dict of the sharded model, i.e. process 0's ``DTensor``
    shards pickled (half of each LoRA matrix on 2 processes), and its loader hands that to
    peft's ``set_peft_model_state_dict`` on process 0 only (an empty dict elsewhere). The
    resumed adapter was wrong (0.24 max abs difference to the uninterrupted run after one
    step, where ``SHARDED_STATE_DICT`` gives 0). The same checkpoint also holds the whole
    adapter as the trainer's ``save_model`` gathered it (``adapter_model.safetensors``):
    that file is read on process 0, its peft names mapped to the model's parameters
    (``lora_A.weight`` -> ``lora_A.<adapter>.weight``), and every process's shards filled
    by ``set_model_state_dict(..., broadcast_from_rank0=True)``. Collective."""
    import os

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or "FULL_STATE_DICT" not in str(getattr(plugin, "state_dict_type", "")):
        return False
    try:
        from peft import PeftModel
    except ImportError:
        return False
    if not isinstance(model, PeftModel):
        return False
    path = os.path.join(checkpoint_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return False
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {}
    if dist.get_rank() == 0:
        saved = load_file(path, device="cpu")
        adapter = f".{model.active_adapter}."
        for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
            for key in (name.replace(adapter, "."), name):
                if key in saved:
                    full[name] = saved.pop(key)
                    break
        if saved:
            raise ValueError(f"{path}: tensors the model does not have: {sorted(saved)[:5]}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, full, options=options)
    return True
