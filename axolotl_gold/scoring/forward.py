"""Forward passes that return only what the loss needs: the completion region.

With ``logits_to_keep = C + 1`` a causal LM computes its head only on the last
``C + 1`` columns; dropping the last one leaves, for each completion token, the
state that predicts it. When the head is a plain ``nn.Linear`` and the model does
not post-process logits, the head is bypassed and the final hidden states come
back instead, so a chunked loss can apply the head itself without ever holding
``[tokens, vocab]`` logits.

The loss then applies the head in the dtype the head would have computed in inside the
forward: under Accelerate's mixed precision the forward runs in autocast, which computes
a float32 head (Axolotl keeps ``embed_tokens`` / ``lm_head`` in float32 for a full
fine-tune) in bf16; outside it, the loss would run the head's matmuls in float32 (on an
H200 without TF32, +0.2 s and +2.5 GiB a step for a 0.5B student's 151,936-token head).
The stand-in that replaces the head during the forward records that dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from axolotl_gold.scoring import causal_rows

# configs that transform logits after the head: bypassing the head would skip that
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / compile wrappers (not peft: peft forwards to the head)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def bypassable_head(model: nn.Module) -> nn.Linear | None:
    """The output head if the loss may apply it itself, else None.

    A bitsandbytes-quantized head (``Linear4bit`` / ``Linear8bitLt``, only when
    ``llm_int8_skip_modules`` leaves it out: bitsandbytes keeps ``lm_head`` in the load
    dtype by default) is not a plain ``nn.Linear``: the model applies it, and the loss
    reads its completion-region logits."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not _plain_linear(head):  # LoRA / modules_to_save wrappers change the weight
        return None
    config = getattr(inner, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if any(getattr(config, key, None) for key in _LOGIT_POSTPROCESSING):
        return None
    return head


def _plain_linear(head) -> bool:
    """``nn.Linear`` itself, or FSDP2's ``fully_shard`` of one (``FSDPLinear``: the class
    FSDP2 derives from ``FSDPModule`` and ``nn.Linear``; its weight is the head's, sharded
    or, inside ``models.fsdp2.gathered_heads``, gathered). Any other subclass or wrapper
    may change what the weight means."""
    cls = type(head)
    if cls is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    if not issubclass(cls, FSDPModule):
        return False
    return [b for b in cls.__bases__ if not issubclass(b, FSDPModule)] == [nn.Linear]


@contextlib.contextmanager
def _head_as_identity(model: nn.Module, head: nn.Linear):
    """The head module swapped for an identity during the forward pass.

    The head is not called at all (not even with an identity ``forward``): under
    ZeRO-3 a module call runs DeepSpeed's hooks, whose release would re-partition
    the head weight the loss is about to use.
    """
    parent, attr = _owner(unwrap(model), head)
    stand_in = _stand_in_for(head)
    setattr(parent, attr, stand_in)
    try:
        yield stand_in
    finally:
        setattr(parent, attr, head)


class HeadStandIn(nn.Identity):
    """The head's place during the forward: passes the hidden states through and records
    the autocast dtype the head would have computed in (None outside autocast)."""

    autocast_dtype: torch.dtype | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        self.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return hidden


def _stand_in_for(head: nn.Module) -> HeadStandIn:
    stand_in = HeadStandIn()
    kind = type(head._parameters)
    if kind is not type(stand_in._parameters):
        # DeepSpeed ZeRO-3 gives every module its own parameter dict type (it flags
        # modules in a forward pass through it): the stand-in gets one too
        stand_in._parameters = kind(parent_module=stand_in)
    return stand_in


def _owner(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for attr, value in module.named_children():
            if value is child:
                return module, attr
    raise ValueError("the output head is not a submodule of the model")


@dataclass
class CompletionStates:
    """``values`` is ``[B, C, H]`` hidden states when ``head`` is set, else ``[B, C, V]`` logits.

    ``compute_dtype``: the autocast dtype the forward ran in when the head was bypassed
    (None: the head's own dtype); ``head_weight`` / ``head_bias`` are the head's parameters
    in it, as autocast would have cast them for the head's matmul (differentiable casts:
    the gradient reaches the parameter in its own dtype)."""

    values: torch.Tensor
    head: nn.Linear | None
    compute_dtype: torch.dtype | None = None

    def head_weight(self) -> torch.Tensor:
        return self._cast(self.head.weight)

    def head_bias(self) -> torch.Tensor | None:
        return None if self.head.bias is None else self._cast(self.head.bias)

    def _cast(self, param: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        return param if dtype is None or param.dtype == dtype or not param.is_floating_point() else param.to(dtype)


def completion_states(model: nn.Module, batch: dict, use_head_bypass: bool) -> CompletionStates:
    """Run ``model`` on a scoring batch and keep the completion region only (its rows
    moved left where attention then needs no padding mask: ``causal_rows``).

    A model that is not run here (a teacher server's ``RemoteTeacher``, ``models.remote``)
    has its own ``completion_states(batch, use_head_bypass)`` and answers the same way.
    """
    remote = getattr(model, "completion_states", None)
    if remote is not None:
        return remote(batch, use_head_bypass)
    width = batch["completion_labels"].shape[1]
    device = batch["input_ids"].device
    head = bypassable_head(model) if use_head_bypass else None
    if head is not None and head.weight.device != device:
        # a device_map placed the head elsewhere (another GPU, or offloaded: its weight
        # is on ``meta`` between calls): the model applies it, its logits come here
        head = None
    ctx = _head_as_identity(model, head) if head is not None else contextlib.nullcontext()
    inner = unwrap(model)
    if causal_rows.rolls(inner, batch, bypassed=head is not None):
        ids, lead = causal_rows.rolled_left(batch["input_ids"], batch["attention_mask"])
        with ctx as stand_in, causal_rows.causal_attention(inner.config):
            out = model(input_ids=ids, logits_to_keep=0, use_cache=False)
        values = causal_rows.completion_region(out.logits, lead, width)
    else:
        with ctx as stand_in:
            kwargs = dict(batch.get("vision") or {})  # pixel_values etc. of a vision batch
            if "position_ids" in batch:
                kwargs["position_ids"] = batch["position_ids"]
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=width + 1,
                use_cache=False,
                **kwargs,
            )
        values = out.logits[:, -(width + 1): -1]
    if values.device != device:  # a device_map ending on another device
        values = values.to(device)
    return CompletionStates(values=values, head=head, compute_dtype=head_compute_dtype(stand_in, head))


# the autocast dtypes the loss follows for a bypassed head: bf16 only. Under float16 the
# head stays float32 on purpose: the fused losses form the logit gradient inside their
# forward, of the summed loss, before the GradScaler's scale reaches it (the backward
# multiplies it in afterwards), and cast it to the head's compute dtype for the matmul
# into hidden and weight gradients; in float16 every entry below 6e-8 (most of a 152k
# vocabulary's probability differences) would flush to zero, where the model's own
# autocast head gets them scaled by autograd. bfloat16 has float32's exponent range.
FOLLOWED_AUTOCAST = (torch.bfloat16,)


def head_compute_dtype(stand_in: HeadStandIn | None, head: nn.Linear | None) -> torch.dtype | None:
    """The dtype the loss applies ``head`` in: the forward's autocast dtype when it is
    followed and lower than the head's, else None (the head's own)."""
    if stand_in is None or head is None:
        return None
    dtype = stand_in.autocast_dtype
    if dtype not in FOLLOWED_AUTOCAST or head.weight.dtype != torch.float32:
        return None
    return dtype


def first_rows(tensor: torch.Tensor | None, count: int | None, dim: int = 0) -> torch.Tensor | None:
    """The first ``count`` entries of ``tensor`` along ``dim`` (None: all). ``tensor`` itself
    when that is all of them: a slice, even of the whole, has a backward that allocates a
    zero tensor of the whole's size (a float32 ``[V, H]`` head gradient) to copy into."""
    if tensor is None or count is None or count >= tensor.shape[dim]:
        return tensor
    return tensor.narrow(dim, 0, count)
