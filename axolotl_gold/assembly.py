"""The one assembly path: validated settings -> teacher, objective, engines, collator.

Built top-down here, once, after Axolotl created the trainer (the plugin's
``post_trainer_create``); the trainer then only orchestrates what it is handed
(``GoldTrainer.setup_gold``).
"""

from __future__ import annotations

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.data.batching import GoldCollator
from axolotl_gold.data.turns import stop_token_ids
from axolotl_gold.models.compatibility import check_runtime_tokens, shared_vocab_size
from axolotl_gold.models.sharding import sharding_for
from axolotl_gold.models.student import disable_dropout
from axolotl_gold.rollouts.engines.factory import EngineContext, build_engines
from axolotl_gold.scoring.objectives import JsdObjective, UldObjective
from axolotl_gold.trainer.parts import GoldParts


def assemble(cfg, trainer) -> GoldParts:
    """Build the parts for Axolotl's ``trainer`` from its validated ``cfg``.

    ``cfg`` is read once into ``GoldSettings``; Axolotl's own loaders (the student's
    processor) and the dataset sections are the only other things read from it.
    """
    settings = GoldSettings.from_cfg(cfg)
    tokenizer = trainer.processing_class
    vision = None
    if settings.vision:
        from axolotl_gold.vision.setup import check_datasets, freeze_vision_tower, student_vision

        vision = student_vision(cfg, tokenizer, settings)
        check_datasets(cfg, settings, trainer.train_dataset, trainer.eval_dataset)
        if not settings.train_vision_tower:
            freeze_vision_tower(trainer.model)
    sharding = sharding_for(trainer.accelerator)
    if not settings.use_uld_loss:
        check_runtime_tokens(cfg, tokenizer)
    if settings.teacher_server.enabled:
        from axolotl_gold.models.remote.router import connect_teachers

        # the teacher runs in its server (or one per row's teacher name): only the output
        # head is loaded here (exact mode), or nothing (a vLLM server's top-k log-probs)
        teacher = connect_teachers(settings, trainer.accelerator.device)
    else:
        teacher = sharding.load_teacher(settings, trainer.accelerator)
    disable_dropout(trainer.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # ONE stop set (eos, generation_config eos, the template's turn end) for every
    # engine and for ULD's end-of-completion handling
    stop_ids = stop_token_ids(tokenizer, getattr(trainer.model, "generation_config", None))
    objective = build_objective(settings, trainer.model, teacher, tokenizer, stop_ids)
    ctx = EngineContext(
        get_student=lambda: trainer.model,
        get_teacher=lambda: trainer.teacher,
        get_step=lambda: trainer.state.global_step,
        device=trainer.accelerator.device,
        num_processes=trainer.accelerator.num_processes,
        is_main_process=trainer.accelerator.is_main_process,
        teacher_samples_in_lockstep=sharding.teacher_samples_in_lockstep,
        # a sampled image token would make the model look for image features
        suppress_tokens=vision.vision_token_ids if vision is not None else None,
    )
    student_engine, teacher_engine = build_engines(settings, ctx, pad_id, stop_ids)
    if vision is not None:
        from axolotl_gold.vision.batch import GoldVisionCollator

        collator = GoldVisionCollator(vision, dataset_config(cfg), settings.max_completion_length)
    else:
        collator = GoldCollator()
    return GoldParts(
        settings=settings,
        teacher=teacher,
        objective=objective,
        collator=collator,
        student_engine=student_engine,
        teacher_engine=teacher_engine,
        tokenizer=tokenizer,
        pad_id=pad_id,
        stop_ids=stop_ids,
        vision=vision,
        sharding=sharding,
    )


def build_objective(settings: GoldSettings, student, teacher, student_tokenizer, stop_ids=None):
    """JSD for one tokenizer, ULD (or hybrid ULD) across two; top-k + tail JSD for a teacher
    known by its top-k log-probabilities (``teacher_server_mode: prompt_logprobs``)."""
    if settings.teacher_server.enabled and settings.teacher_server.mode == "prompt_logprobs":
        from axolotl_gold.scoring.topk import TopKTailObjective

        return TopKTailObjective(
            beta=settings.beta,
            temperature=settings.loss_temperature,
            chunk_size=settings.loss_chunk_size,
            vocab_size=shared_vocab_size(student, teacher),
        )
    if not settings.use_uld_loss:
        return JsdObjective(
            beta=settings.beta,
            temperature=settings.loss_temperature,
            chunk_size=settings.loss_chunk_size,
            vocab_size=shared_vocab_size(student, teacher),
            backend=settings.jsd_backend,
        )
    from transformers import AutoTokenizer

    from axolotl_gold.crosstok.teacher_inputs import CrossTokenizerInputs
    from axolotl_gold.losses.uld import ULDConfig, build_vocab_mapping

    uld = settings.uld
    teacher_tokenizer = AutoTokenizer.from_pretrained(settings.teacher.tokenizer, revision=settings.teacher.revision)
    for name, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False) and uld.alignment_fallback is None:
            raise GoldConfigError(
                f"the {name} tokenizer ({type(tok).__name__}) gives no byte offsets, which "
                "cross-tokenizer alignment needs: use a fast tokenizer, or set "
                "`uld_alignment_fallback: positional` to pair tokens by position."
            )
    inputs = CrossTokenizerInputs(
        student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        max_prompt_length=settings.max_prompt_length,
        prompt_mode=uld.teacher_prompt,
        skip_student_eos=uld.skip_student_eos,
        skip_teacher_eos=uld.skip_teacher_eos,
        alignment_fallback=uld.alignment_fallback,
        teacher_template_kwargs=dict(uld.teacher_template_kwargs),
    )
    if stop_ids is not None:
        inputs.student_stop_ids = stop_ids
    if settings.vision:
        from axolotl_gold.vision.setup import teacher_vision

        inputs.teacher_vision = teacher_vision(settings)
    config = ULDConfig(
        student_temperature=uld.student_temperature,
        teacher_temperature=uld.teacher_temperature,
        merge=uld.merge,
        distillation_weight=uld.distillation_weight,
        crossentropy_weight=uld.crossentropy_weight,
        hybrid_matched_weight=uld.hybrid_matched_weight,
        hybrid_unmatched_weight=uld.hybrid_unmatched_weight,
        hybrid_beta=settings.beta,
    )
    mapping = build_vocab_mapping(student_tokenizer, teacher_tokenizer) if uld.hybrid else None
    return UldObjective(inputs=inputs, config=config, mapping=mapping)


def dataset_config(cfg) -> dict:
    """The first training dataset's keys (field names apply to raw image rows)."""
    datasets = cfg.get("datasets") or []
    first = datasets[0] if datasets else {}
    return dict(first) if first else {}
