"""Finding FSDP2's modules and parameter groups (private state read where no public API exists), resharding, and a one-line description of how a model is held."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


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


def _is_fsdp_hook(hook) -> bool:
    """A forward (pre-)hook ``fully_shard`` registered: a bound method of FSDP's state or
    a closure of its module (its group hooks); bound methods report their function's module."""
    return (getattr(hook, "__module__", None) or "").startswith("torch.distributed.fsdp")


@contextlib.contextmanager
def forward_hooks_set_aside(model: nn.Module) -> Iterator[None]:
    """FSDP2's forward hooks off every module of ``model`` for the context, back after in
    their places (other hooks, e.g. peft's or Accelerate's, stay throughout).

    Only for forwards on groups already unsharded and kept so (``generation_weights``):
    there the hooks have nothing to gather or free, but the root's still makes FSDP's
    all-gather streams wait on the current one, which a CUDA graph capture of a decode
    step cannot contain (an unjoined stream), and every hook costs host time per step."""
    saved = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            if any(_is_fsdp_hook(h) for h in hooks.values()):
                saved.append((hooks, list(hooks.items())))
                for key in [k for k, h in hooks.items() if _is_fsdp_hook(h)]:
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()  # the same dict, refilled in the original order
            hooks.update(items)


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
