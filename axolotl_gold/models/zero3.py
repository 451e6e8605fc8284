"""DeepSpeed ZeRO-3: the teacher partitioned for inference, gathered weights where
GOLD reads them directly.

Under ZeRO-3 every parameter lives in shards across processes and is gathered by
module hooks only while its module runs. GOLD reads three things outside a module
call, so this module gathers them explicitly:

- rollouts: the student's full weights for the window's one ``generate`` call
  (DeepSpeed's own ``unwrap_model_for_generation``: gathered once, hooks off);
- the fused loss: both output heads' weights, applied chunk by chunk by the loss,
  gathered across the micro-step's forward and backward (the student's head
  gradient is then reduce-scattered by DeepSpeed's gradient hooks as usual);
- the teacher: loaded whole (outside transformers' ``zero.Init``, which Axolotl's
  ZeRO-3 loader leaves switched on for good) and partitioned by an inference engine
  without optimizer, created once the student's engine exists.
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn


def zero3_enabled(accelerator) -> bool:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def _resolve_auto(value, default):
    return default if value == "auto" else value


@contextlib.contextmanager
def full_loading():
    """``from_pretrained`` outside transformers' ``zero.Init``: the engine partitions it."""
    import transformers.modeling_utils as modeling_utils
    from transformers.integrations import deepspeed as hf_ds

    # Axolotl's ZeRO-3 loader replaces transformers' check with `lambda: True` for good
    saved = (modeling_utils.is_deepspeed_zero3_enabled, hf_ds.is_deepspeed_zero3_enabled)
    modeling_utils.is_deepspeed_zero3_enabled = lambda: False
    hf_ds.is_deepspeed_zero3_enabled = lambda: False
    try:
        yield
    finally:
        modeling_utils.is_deepspeed_zero3_enabled, hf_ds.is_deepspeed_zero3_enabled = saved


def _consistent_batch(config: dict, world_size: int) -> None:
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(accum, int):
        config["train_batch_size"] = micro * accum * world_size


def inference_engine(model: nn.Module, ds_config: dict, world_size: int):
    """``model`` (partitioned, or partitioned now) in a DeepSpeed engine without
    optimizer; ``ds_config`` is the training run's DeepSpeed config."""
    import deepspeed

    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    _consistent_batch(config, world_size)
    zero = config.setdefault("zero_optimization", {})
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    hidden = getattr(text, "hidden_size", None) or 1024
    zero["reduce_bucket_size"] = _resolve_auto(zero.get("reduce_bucket_size"), hidden * hidden)
    zero["stage3_prefetch_bucket_size"] = _resolve_auto(
        zero.get("stage3_prefetch_bucket_size"), int(0.9 * hidden * hidden)
    )
    zero["stage3_param_persistence_threshold"] = _resolve_auto(
        zero.get("stage3_param_persistence_threshold"), 10 * hidden
    )
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def generation_weights(engine):
    """Context: the student's weights gathered (full) for one generation call."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


# held in a gathered head parameter's ``ds_active_sub_modules`` (module ids are >= 0)
_HELD = -1


def gathered_heads(*heads: nn.Module | None):
    """Context: the given output heads' parameters gathered (read-only: no broadcast) and
    held so across the micro-step's forward and backward; one gather per head (a
    coalesced gather needs one dtype)."""
    stack = contextlib.ExitStack()
    for head in heads:
        params = list(head.parameters(recurse=False)) if head is not None else []
        if params:
            stack.enter_context(_held(params))
    return stack


@contextlib.contextmanager
def _held(params: list):
    """``GatheredParameters(params, modifier_rank=None)``, but for parameters that modules
    also use: a tied head is the input embedding, whose module runs in the forward, and
    DeepSpeed's hooks release a parameter after its module unless some module is still
    active on it. So each parameter is marked active while held; at the end the ones no
    module holds are partitioned, the others are left to DeepSpeed, which releases them
    with their module (the embedding's backward leaves it active until the step's end)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = sorted({p for p in params if hasattr(p, "ds_id")}, key=lambda p: p.ds_id)  # same order everywhere
    if not params:
        yield
        return
    params[0].all_gather(param_list=params)
    for param in params:
        param.ds_active_sub_modules.add(_HELD)
    try:
        yield
    finally:
        for param in params:
            param.ds_active_sub_modules.discard(_HELD)
        idle = [p for p in params if not p.ds_active_sub_modules and p.ds_status == ZeroParamStatus.AVAILABLE]
        if idle:
            idle[0].partition(param_list=idle, has_been_updated=False)
