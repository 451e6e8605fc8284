"""The teacher sharded for inference (or replicated), loaded without a full copy per GPU."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from axolotl_gold.models.fsdp2.groups import _fsdp_module_cls, _output_head, describe

LOG = logging.getLogger(__name__)


def _decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            classes = {type(layers[0])}
    return tuple(classes)


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _set_buffer(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    parent, _, name = fqn.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    module.register_buffer(name, value, persistent=False)


def _broadcast_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], device, src: int = 0) -> None:
    """Non-persistent buffers (e.g. rotary ``inv_freq``) are in no state dict: rank 0's
    values, broadcast (other ranks may hold meta or uninitialized ones)."""
    rank = dist.get_rank()
    for fqn, buf in sorted(buffers.items()):
        if rank == src:
            value = buf.detach().to(device).contiguous()
        else:
            value = torch.empty(buf.shape, dtype=buf.dtype, device=device)
        dist.broadcast(value, src=src)
        _set_buffer(model, fqn, value)


def _rank0_only_loading() -> bool:
    """Accelerate's ``cpu_ram_efficient_loading`` (its environment variables): transformers'
    ``from_pretrained`` then reads the weights on local rank 0 only and fills the other
    ranks' tensors with zeros (real CPU tensors, not meta): rank 0's must be broadcast."""
    import os

    def on(key):
        return os.environ.get(key, "false").lower() in ("1", "true", "yes")

    return on("ACCELERATE_USE_FSDP") and on("FSDP_CPU_RAM_EFFICIENT_LOADING")


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    index = torch.accelerator.current_device_index() if hasattr(torch, "accelerator") else 0
    return torch.device(mesh.device_type, index)


def shard_teacher(
    teacher: nn.Module,
    mesh=None,
    replicate: bool = False,
    *,
    mp_policy=None,
    offload_policy=None,
    layer_classes: tuple[type, ...] | None = None,
    broadcast_from_rank0: bool | None = None,
    separate_head: bool = False,
) -> nn.Module:
    """The teacher frozen for inference: sharded with FSDP2, or replicated.

    Sharded (default): ``fully_shard`` on every decoder layer (``_no_split_modules``, or
    ``model.layers``), then on the root; ``reshard_after_forward=True`` everywhere (the
    root included: there is no backward to keep it for), parameters
    ``requires_grad=False``, ``eval()``. No optimizer ever sees it. ``mp_policy`` /
    ``offload_policy`` are passed on (the training run's ``MixedPrecisionPolicy`` /
    ``CPUOffloadPolicy``). ``separate_head`` (an untied head only) also gives the input
    embeddings and the output head a group each, so that ``gathered_heads`` gathers the
    head alone rather than the whole root group (embeddings + head + final norm); but
    ``fully_shard`` changes the head's class to ``FSDPLinear``, which
    ``axolotl_gold.scoring.forward.bypassable_head`` (``type(head) is nn.Linear``) does not
    take as a plain head today: the fused loss would fall back to full teacher logits.
    Hence off by default until ``bypassable_head`` accepts ``FSDP``-wrapped ``nn.Linear``.

    Loading without a full copy per GPU: load the teacher on the CPU (not on the GPU)
    and pass it here; ``fully_shard`` is applied bottom-up, so only one group's full
    weights reach the device at a time before being cut into shards. Better, load the
    weights on rank 0 only and build the teacher on the ``meta`` device elsewhere
    (``with torch.device("meta"): AutoModelForCausalLM.from_config(cfg)``), as
    Accelerate's ``cpu_ram_efficient_loading`` does for the student: then only rank 0
    holds a CPU copy; the model is sharded on ``meta``, allocated shard-sized
    (``to_empty``) and filled by ``set_model_state_dict(..., broadcast_from_rank0=True)``
    tensor by tensor, non-persistent buffers (rotary ``inv_freq``) broadcast from rank
    0. ``broadcast_from_rank0=None`` picks that path when any rank holds meta tensors, or
    when Accelerate's ``cpu_ram_efficient_loading`` is on (then transformers loaded zeros,
    not weights, on the other ranks).

    Replicated (``replicate=True``): the teacher whole on every device (the user says it
    fits), no FSDP; meta ranks get rank 0's weights by broadcast.
    """
    from torch.distributed.device_mesh import init_device_mesh

    teacher.requires_grad_(False)
    teacher.eval()
    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    device = _mesh_device(mesh)
    meta = _has_meta(teacher)
    if broadcast_from_rank0 is None:
        broadcast_from_rank0 = _any_rank(meta, device) or _rank0_only_loading()
    rank0 = dist.get_rank() == 0
    if broadcast_from_rank0 and rank0 and meta:
        raise ValueError("shard_teacher(broadcast_from_rank0=True): rank 0 must hold the real weights")

    buffers = _non_persistent_buffers(teacher)
    if replicate:
        if broadcast_from_rank0:
            if meta:
                teacher.to_empty(device=device)
            else:
                teacher.to(device)
            for _, tensor in sorted(teacher.state_dict(keep_vars=True).items()):
                dist.broadcast(tensor.data, src=0)  # tied tensors twice: harmless
            _broadcast_buffers(teacher, buffers, device)
        else:
            teacher.to(device)
        return teacher

    from torch.distributed.fsdp import fully_shard

    full_sd = None
    if broadcast_from_rank0:
        if rank0:
            full_sd = {k: v.detach() for k, v in teacher.state_dict().items()}
        teacher.to(torch.device("meta"))  # rank 0's weights live on in full_sd
        if hasattr(teacher, "tie_weights"):
            teacher.tie_weights()

    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    classes = layer_classes if layer_classes is not None else _decoder_layer_classes(teacher)
    cls = _fsdp_module_cls()
    for module in reversed(list(teacher.modules())):  # bottom-up
        if classes and isinstance(module, classes) and not isinstance(module, cls):
            fully_shard(module, **kwargs)
    head = _output_head(teacher)
    embed = teacher.get_input_embeddings() if hasattr(teacher, "get_input_embeddings") else None
    tied = head is not None and embed is not None and head.weight is embed.weight
    if separate_head and head is not None and embed is not None and not tied:
        for module in (embed, head):
            if not isinstance(module, cls):
                fully_shard(module, **kwargs)
    fully_shard(teacher, **kwargs)

    if broadcast_from_rank0:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        cpu = offload_policy is not None and type(offload_policy).__name__ == "CPUOffloadPolicy"
        teacher.to_empty(device=torch.device("cpu") if cpu else device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(teacher, full_sd if rank0 else {}, options=options)
        _broadcast_buffers(teacher, buffers, device)
    else:
        for fqn, buf in buffers.items():  # fully_shard moved them already; be sure
            if buf.device != device and not buf.is_meta:
                _set_buffer(teacher, fqn, buf.to(device))
    teacher.requires_grad_(False)
    return teacher


def accelerator_policies(accelerator) -> dict:
    """The training run's FSDP2 policies (``fsdp_config``: mixed precision, CPU offload),
    as ``shard_teacher`` keyword arguments, so the teacher computes in the student's
    precision and lives where its parameters do. The mesh is the accelerator's
    data-parallel shard mesh when it built one (else ``shard_teacher`` builds one over
    all processes)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    out = {}
    if plugin is None:
        return out
    mp = getattr(plugin, "mixed_precision_policy", None)
    if mp is not None and type(mp).__name__ == "MixedPrecisionPolicy":
        out["mp_policy"] = mp
    offload = getattr(plugin, "cpu_offload", None)
    if offload is not None and type(offload).__name__ == "CPUOffloadPolicy":
        out["offload_policy"] = offload
    mesh = getattr(accelerator, "torch_device_mesh", None)
    parallelism = getattr(accelerator, "parallelism_config", None)
    if mesh is not None and parallelism is not None:
        try:
            out["mesh"] = mesh[tuple(parallelism.fsdp_dim_names)]
        except (KeyError, RuntimeError, AttributeError):
            pass
    return out


def load_sharded_teacher(teacher_settings, accelerator, replicate: bool = False) -> nn.Module:
    """The teacher for an FSDP2 run, never whole on any GPU on the way (unless
    ``replicate``): process 0 reads the weights on the CPU, the others build it on
    ``meta``; ``shard_teacher`` cuts it into DTensor shards (or replicates it) and fills
    every process's part from process 0's copy."""
    from axolotl_gold.models.teacher import load_teacher

    meta = dist.is_initialized() and dist.get_rank() != 0
    teacher = load_teacher(teacher_settings, None, meta=meta)
    teacher = shard_teacher(teacher, replicate=replicate, **accelerator_policies(accelerator))
    LOG.info("GOLD teacher under FSDP2: %s", describe(teacher))
    return teacher
