"""How the student and the teacher are held across processes, as one object the trainer
asks at fixed points: whole (one process, DDP), DeepSpeed ZeRO-3, or FSDP2.

The trainer never branches on the strategy; it calls ``window_ready`` before each window
and evaluation batch, enters ``rollout_weights`` around a window's engine call and
``head_weights`` around a micro-step, and calls ``after_eval`` after an evaluation. The gathers
themselves live in ``zero3`` and ``fsdp2``.
"""

from __future__ import annotations

import contextlib
import logging

from axolotl_gold.models import fsdp2, zero3
from axolotl_gold.models.teacher import load_teacher
from axolotl_gold.scoring.forward import bypassable_head

LOG = logging.getLogger(__name__)


class Whole:
    """Every process holds whole models: nothing to gather."""

    name = "whole"
    # the teacher gathers its shards in its own forwards while it samples (``seq_kd``):
    # the processes must decode in lockstep (``generate``'s ``synced_gpus``)
    teacher_samples_in_lockstep = False

    def load_teacher(self, settings, accelerator):
        """The teacher as this strategy holds it (``settings``: ``GoldSettings``)."""
        return load_teacher(settings.teacher, accelerator.device)

    def window_ready(self, student, teacher, accelerator):
        """Before a window (or an eval batch): the teacher as the window uses it."""
        return teacher

    def rollout_weights(self, student, teacher=None):
        """Around one engine call: ``student`` / ``teacher`` (or None) sample in it."""
        return contextlib.nullcontext()

    def eval_rollout_weights(self, student):
        """Around an evaluation batch's engine call."""
        return contextlib.nullcontext()

    def head_weights(self, student, teacher):
        """Around a micro-step's forward, fused loss and backward."""
        return contextlib.nullcontext()

    def after_eval(self, student) -> None:
        pass

    def load_checkpoint(self, accelerator, model, path) -> bool:
        """True when this strategy loaded the checkpoint itself."""
        return False


class Zero3(Whole):
    """DeepSpeed ZeRO-3: the student partitioned by the trainer's engine, the teacher in
    an inference engine (made once the student's engine exists)."""

    name = "zero3"
    teacher_samples_in_lockstep = True  # its inference engine is not gathered for sampling

    def load_teacher(self, settings, accelerator):
        # loaded whole (not partitioned at load); ``window_ready`` partitions it
        with zero3.full_loading():
            return load_teacher(settings.teacher, accelerator.device)

    def window_ready(self, student, teacher, accelerator):
        if hasattr(teacher, "optimizer"):  # already an engine
            return teacher
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        return zero3.inference_engine(teacher, ds_config, accelerator.num_processes)

    def rollout_weights(self, student, teacher=None):
        if student is None:
            return contextlib.nullcontext()
        return zero3.generation_weights(student)

    def eval_rollout_weights(self, student):
        # an eval forward (no backward, no step) leaves prefetched parameters in flight,
        # which the gather for generation would trip over: release them first
        student.empty_partition_cache()
        return zero3.generation_weights(student)

    def head_weights(self, student, teacher):
        return zero3.gathered_heads(bypassable_head(student), bypassable_head(teacher))

    def after_eval(self, student) -> None:
        if hasattr(student, "empty_partition_cache"):
            student.empty_partition_cache()  # the next window gathers anew


class Fsdp2(Whole):
    """FSDP2: the student sharded by Axolotl, the teacher sharded for inference (or
    replicated); every process enters each gather (they are collectives)."""

    name = "fsdp2"

    def __init__(self):
        self._described = False

    def load_teacher(self, settings, accelerator):
        # read on process 0's CPU, sharded for inference (or replicated)
        return fsdp2.load_sharded_teacher(settings.teacher, accelerator, settings.teacher_replicate)

    def window_ready(self, student, teacher, accelerator):
        if not self._described:
            LOG.info("GOLD student under FSDP2: %s", fsdp2.describe(student))
            self._described = True
        return teacher

    def rollout_weights(self, student, teacher=None):
        return fsdp2.rollout_weights(student, teacher)

    def eval_rollout_weights(self, student):
        return fsdp2.rollout_weights(student)

    def head_weights(self, student, teacher):
        return fsdp2.gathered_heads(
            student if bypassable_head(student) is not None else None,
            teacher if bypassable_head(teacher) is not None else None,
        )

    def after_eval(self, student) -> None:
        fsdp2.reshard(student)  # eval forwards leave the root gathered

    def load_checkpoint(self, accelerator, model, path) -> bool:
        # a LoRA student with FULL_STATE_DICT: Accelerate 1.13 loads it wrong
        return fsdp2.load_full_adapter_checkpoint(accelerator, model, path)


def sharding_for(accelerator) -> Whole:
    if zero3.zero3_enabled(accelerator):
        return Zero3()
    if fsdp2.fsdp2_enabled(accelerator):
        return Fsdp2()
    return Whole()
