"""Which engines ``build_engines`` makes, and with which ``generate`` arguments: the
processes never decode in lockstep unless the model sampling gathers shards in its own
forwards (ZeRO-3's teacher inference engine under ``seq_kd``), which then samples with HF
generate whatever the engine setting (no CUDA graph may capture its collectives)."""

import pytest
import torch

from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.rollouts.engines.factory import EngineContext, build_engines
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.rollouts.engines.static import StaticCacheEngine


def _ctx(**kw):
    return EngineContext(get_student=lambda: None, get_teacher=lambda: None, get_step=lambda: 0,
                         device=torch.device("cpu"), **kw)


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("lockstep", [False, True])
def test_only_a_teacher_that_gathers_in_its_forwards_samples_in_lockstep(engine, lockstep):
    settings = GoldSettings.from_cfg({"teacher_model": "t", "seq_kd": True, "gold_generation_engine": engine})
    student, teacher = build_engines(settings, _ctx(teacher_samples_in_lockstep=lockstep),
                                     pad_id=0, stop_ids={1})
    cls = StaticCacheEngine if engine == "static" else HFGenerateEngine
    assert type(student) is cls
    assert student.generate_kwargs == {"synced_gpus": False}
    # a teacher that gathers in its forwards (ZeRO-3's) samples with HF generate, in lockstep:
    # no synced_gpus given, so transformers turns it on under ZeRO-3
    assert type(teacher) is (HFGenerateEngine if lockstep else cls)
    assert teacher.generate_kwargs == ({} if lockstep else {"synced_gpus": False})


def test_suppressed_tokens_stay_beside_synced_gpus():
    settings = GoldSettings.from_cfg({"teacher_model": "t"})
    student, teacher = build_engines(settings, _ctx(suppress_tokens=[7]), pad_id=0, stop_ids={1})
    assert teacher is None
    assert student.generate_kwargs == {"suppress_tokens": [7], "synced_gpus": False}


@pytest.mark.parametrize("lockstep", [False, True])  # ZeRO-3's seq_kd teacher: HF generate
def test_auto_picks_the_static_engine_on_cuda_for_text_sharded_or_not(lockstep):
    # FSDP2 / ZeRO-3 sample from weights gathered for the call with their hooks off: the
    # static engine serves them (on one H200 under FSDP2, 3.5 ms per token step against 20)
    settings = GoldSettings.from_cfg({"teacher_model": "t", "seq_kd": True})
    ctx = EngineContext(get_student=lambda: None, get_teacher=lambda: None, get_step=lambda: 0,
                        device=torch.device("cuda"), teacher_samples_in_lockstep=lockstep)
    student, teacher = build_engines(settings, ctx, pad_id=0, stop_ids={1})
    assert type(student) is StaticCacheEngine
    assert type(teacher) is (HFGenerateEngine if lockstep else StaticCacheEngine)
    vision = GoldSettings.from_cfg({"teacher_model": "t", "processor_type": "AutoProcessor",
                                    "skip_prepare_dataset": True})
    assert type(build_engines(vision, ctx, pad_id=0, stop_ids={1})[0]) is HFGenerateEngine  # images: auto = HF


@pytest.mark.parametrize("lockstep", [False, True])
def test_fused_projections_are_the_students_static_engines_alone(lockstep):
    """``gold_rollout_fuse_projections`` reaches the student's static engine; the teacher's
    (``seq_kd``) samples without the copies, whichever engine it gets."""
    settings = GoldSettings.from_cfg({"teacher_model": "t", "seq_kd": True, "gold_generation_engine": "static",
                                      "gold_rollout_fuse_projections": True, "gold_rollout_compile": True})
    student, teacher = build_engines(settings, _ctx(teacher_samples_in_lockstep=lockstep), pad_id=0, stop_ids={1})
    assert student.fuse_projections and student.compile_decode
    assert not getattr(teacher, "fuse_projections", False)
    plain = build_engines(GoldSettings.from_cfg({"teacher_model": "t", "gold_generation_engine": "static"}),
                          _ctx(), pad_id=0, stop_ids={1})[0]
    assert not plain.fuse_projections and not plain.compile_decode
    # unset, it follows gold_rollout_compile (the knob for a fast decode); false turns it off
    for keys, fused in (({"gold_rollout_compile": True}, True),
                        ({"gold_rollout_compile": True, "gold_rollout_fuse_projections": False}, False),
                        ({"gold_rollout_fuse_projections": True}, True),
                        # a sharded student: each process would hold whole copies beside its shard
                        ({"gold_rollout_compile": True, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}, False),
                        ({"gold_rollout_compile": True, "deepspeed": {"zero_optimization": {"stage": 3}}}, False),
                        ({"gold_rollout_compile": True, "deepspeed": {"zero_optimization": {"stage": 3}},
                          "gold_rollout_fuse_projections": True}, True)):
        settings = GoldSettings.from_cfg({"teacher_model": "t", "gold_generation_engine": "static", **keys})
        assert build_engines(settings, _ctx(), pad_id=0, stop_ids={1})[0].fuse_projections is fused
