"""Full weights where GOLD reads them outside a module call: the output heads once per micro-step, every group once per rollout call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from axolotl_gold.models.fsdp2.groups import (
    _enclosing, _groups, _lazy_init, _output_head, _owners, forward_hooks_set_aside, fsdp_modules,
)


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

    Yields the model itself: ``generate`` (or the static engine) runs on it as usual,
    with FSDP's forward hooks set aside for the context (``forward_hooks_set_aside``:
    every group is gathered, so they would do nothing but cost host time per decoding
    step, and the root's stream waits cannot sit in a CUDA graph capture). No collective
    runs during decoding (the engines pass ``generate`` ``synced_gpus=False``: transformers
    would all-reduce the stop flags every token for an FSDP module). Peak memory is the
    full student per device, as with ZeRO-3's
    ``unwrap_model_for_generation``.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    _lazy_init(modules[0])
    with _kept_unsharded(modules), forward_hooks_set_aside(model):
        yield model


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
