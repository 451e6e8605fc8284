"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the teacher sharded for inference,
full weights where GOLD reads them outside a module call.

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0; the pre-forward hook of
each ``fully_shard``-ed module all-gathers its group into plain unsharded parameters
(swapped onto the modules), the post-forward hook frees them again when
``reshard_after_forward`` holds (never for the root, whose group stays gathered until
its post-backward), and the post-backward reduce-scatters the unsharded gradients
(averaged over the processes) into the sharded ``.grad``. GOLD reads three things
outside a module call, so this module drives FSDP's own ``unshard`` / ``reshard``:

- rollouts (``generation_weights``): every group of the student unsharded once for the
  window's ``generate`` call, with resharding after forward switched off meanwhile, so
  the decoding steps run on full weights without any per-layer all-gather (and without
  collectives: processes may decode different lengths);
- the fused losses (``gathered_heads``): the groups that own the output heads
  unsharded once per micro-step, across forward, loss and backward. The loss applies
  the head weight chunk by chunk; it reads the *unsharded parameter* FSDP put on the
  module, so the head's gradient accumulates into it exactly as if the module had been
  called, and FSDP's post-backward reduce-scatters it as usual. (Reading
  ``DTensor.full_tensor()`` instead would be wrong: its backward keeps the local rows
  of each process's own gradient, without the cross-process sum.)
- the teacher (``shard_teacher``): ``fully_shard`` per decoder layer (and per untied
  embedding / head), then the root, ``reshard_after_forward=True`` everywhere, frozen,
  no optimizer; or replicated on every device when it fits.

Only torch / accelerate private attributes of FSDP2's state are touched where no
public API exists (the per-group ``post_forward_mesh_info``, to keep groups gathered
across a forward, and the root's lazy initialization): see ``_groups``."""

from axolotl_gold.models.fsdp2.checkpoint import full_state_dict, load_full_adapter_checkpoint
from axolotl_gold.models.fsdp2.gather import gathered_heads, generation_weights, rollout_weights
from axolotl_gold.models.fsdp2.groups import describe, fsdp2_enabled, fsdp_modules, reshard
from axolotl_gold.models.fsdp2.sharded_teacher import accelerator_policies, load_sharded_teacher, shard_teacher

__all__ = [
    "fsdp2_enabled",
    "fsdp_modules",
    "shard_teacher",
    "gathered_heads",
    "generation_weights",
    "full_state_dict",
    "accelerator_policies",
    "load_sharded_teacher",
    "rollout_weights",
    "reshard",
    "describe",
    "load_full_adapter_checkpoint",
]
