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
across a forward, and the root's lazy initialization): see ``_groups``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

LOG = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- detection
def _fsdp_module_cls():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module | None) -> list[nn.Module]:
    """The ``fully_shard``-ed modules of ``model``, outermost first (pre-order)."""
    cls = _fsdp_module_cls()
    if model is None or cls is None or not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def fsdp2_enabled(model_or_accelerator) -> bool:
    """Whether FSDP2 shards this model (its parameters are DTensors of ``fully_shard``),
    or, given an ``Accelerator``, whether the accelerator runs FSDP version 2."""
    if model_or_accelerator is None:
        return False
    if isinstance(model_or_accelerator, nn.Module):
        if not fsdp_modules(model_or_accelerator):
            return False
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in model_or_accelerator.parameters())
    state = getattr(model_or_accelerator, "state", None)
    if getattr(model_or_accelerator, "is_fsdp2", False) is True:
        return True
    plugin = getattr(state, "fsdp_plugin", None)
    return plugin is not None and int(getattr(plugin, "fsdp_version", 1) or 1) == 2


# ---------------------------------------------------------------- FSDP2 state
def _groups(module: nn.Module) -> list:
    """The FSDP parameter groups of one ``fully_shard``-ed module (private API: torch
    2.13 keeps a list, older releases one group)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return [g for g in groups if g is not None]


def _lazy_init(root: nn.Module) -> None:
    """FSDP2 initializes its root at the first forward (and then sets the root's
    groups not to reshard after forward when that was left to it); we change per-group
    settings before a forward, so the initialization must come first."""
    state = root._get_fsdp_state()
    if getattr(state, "_is_root", None) is None:
        state._lazy_init()


def _owners(model: nn.Module, tensor: torch.Tensor) -> list[nn.Module]:
    """The ``fully_shard``-ed modules whose groups manage ``tensor`` (the sharded or the
    unsharded parameter), outermost first; the nearest enclosing one if none says so."""
    found = []
    for module in fsdp_modules(model):
        for group in _groups(module):
            for fp in group.fsdp_params:
                sharded = getattr(fp, "sharded_param", None)
                unsharded = getattr(fp, "_unsharded_param", None)
                if tensor is sharded or tensor is unsharded:
                    found.append(module)
                    break
            else:
                continue
            break
    return found


def _enclosing(model: nn.Module, child: nn.Module) -> nn.Module | None:
    best = None
    for module in fsdp_modules(model):
        if any(m is child for m in module.modules()):
            best = module  # pre-order: the last match is the innermost
    return best


def _output_head(model: nn.Module) -> nn.Module | None:
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)
    getter = getattr(inner, "get_output_embeddings", None)
    return getter() if callable(getter) else None


@contextlib.contextmanager
def _kept_unsharded(modules: list[nn.Module]) -> Iterator[None]:
    """``modules`` (``fully_shard``-ed) all-gathered once and kept so through any
    forward until the context exits, then resharded; their earlier
    reshard-after-forward settings come back."""
    saved = []
    for module in modules:
        for group in _groups(module):
            saved.append((group, group.post_forward_mesh_info))
            group.post_forward_mesh_info = None  # no reshard after forward
    handles = []
    try:
        # issue every all-gather first, then wait: one collective per group
        handles = [m.unshard(async_op=True) for m in modules]
        for handle in handles:
            if handle is not None:
                handle.wait()
        yield
    finally:
        for group, info in saved:
            group.post_forward_mesh_info = info
        for module in modules:
            module.reshard()  # idempotent: a post-backward may have resharded already


# ---------------------------------------------------------------- stages
def gathered_heads(*models: nn.Module | None):
    """Context: the output-head weights of the given models (student, teacher; ``None``
    and non-FSDP models are skipped) gathered ONCE, for a fused loss that applies them
    chunk by chunk.

    Enter it around the whole micro-step (forward of both models, loss, and the
    backward): the owning FSDP groups are unsharded at entry and stay so through the
    forwards, the loss reads the full unsharded parameters on the head modules, and
    the student's head gradient accumulates in the unsharded parameter, which FSDP's
    post-backward reduce-scatters (averaged over processes, as every other gradient).
    Exiting before the backward would free the weight the loss saved for it.

    Tied heads (``lm_head.weight is embed_tokens.weight``) share one FSDP parameter;
    its group is gathered once. Other parameters of the owning groups (the root group
    usually holds the embeddings and the final norm) are gathered with it:
    ``shard_teacher`` gives an untied teacher head its own group for that reason.
    """
    stack = contextlib.ExitStack()
    owners: list[nn.Module] = []
    for model in models:
        modules = fsdp_modules(model)
        if not modules:
            continue
        _lazy_init(modules[0])
        head = _output_head(model)
        weight = getattr(head, "weight", None) if head is not None else None
        if weight is None:
            continue
        found = _owners(model, weight) or [m for m in [_enclosing(model, head)] if m is not None]
        for module in found:
            if all(module is not o for o in owners):
                owners.append(module)
    if owners:
        stack.enter_context(_kept_unsharded(owners))
    return stack


@contextlib.contextmanager
def generation_weights(model: nn.Module):
    """Context: the student's full weights for one generation call (all FSDP groups
    unsharded once, none resharded by the decoding forwards), then resharded.

    Yields the model itself: ``generate`` runs on it as usual, the FSDP hooks find every
    group gathered and do nothing. No collective runs during decoding (transformers
    still synchronizes the processes' stopping when it sees an FSDP module, which is
    harmless). Peak memory is the full student per device, as with ZeRO-3's
    ``unwrap_model_for_generation``.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    _lazy_init(modules[0])
    with _kept_unsharded(modules):
        yield model


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


# ---------------------------------------------------------------- plugin glue
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


@contextlib.contextmanager
def rollout_weights(student: nn.Module | None, teacher: nn.Module | None = None):
    """The full weights of the models that sample this window (the student for on-policy
    slices, the teacher for ``seq_kd`` ones; None: not sampling), each gathered once
    for its generation call, then resharded. Collective: every process enters with the
    same arguments (the window's draws are the same on every process)."""
    with contextlib.ExitStack() as stack:
        for model in (student, teacher):
            if model is not None:
                stack.enter_context(generation_weights(model))
        yield


def reshard(model: nn.Module | None) -> None:
    """Every FSDP group of ``model`` back to its shards (after an evaluation: forwards
    without a backward leave the root's group gathered)."""
    for module in fsdp_modules(model):
        module.reshard()


def describe(model: nn.Module | None) -> str:
    """One line for the logs: how ``model`` is held on this process (FSDP groups, the
    share of its parameters stored here)."""
    if model is None:
        return "none"
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    total = sum(p.numel() for p in params) or 1
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    groups = len(fsdp_modules(model))
    kind = f"sharded, {groups} FSDP groups" if groups else "replicated (no FSDP)"
    return f"{kind}, {local / total:.3f} of its {total} parameters on this process"


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
