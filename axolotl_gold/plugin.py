"""The Axolotl plugin: ``plugins: [axolotl_gold.GoldPlugin]``.

Inert unless ``teacher_model`` is set, and cheap to import: the trainer, the
teacher and the losses load inside the hooks that need them.
"""

from __future__ import annotations

import contextlib
import logging

from axolotl.integrations.base import BasePlugin

from axolotl_gold.config.schema import GoldConfigError, honour_batch_size, route_chat_datasets

LOG = logging.getLogger(__name__)


def gold_enabled(cfg) -> bool:
    return bool(cfg.get("teacher_model"))


class GoldPlugin(BasePlugin):
    """On-policy logit distillation from ``teacher_model`` (see the README)."""

    def register(self, cfg) -> None:
        if gold_enabled(cfg):
            route_chat_datasets(cfg)
            honour_batch_size(cfg)
            # the earliest hook: Axolotl patches modeling code before `pre_model_load`
            from axolotl_gold.models.teacher import record_teacher_modeling

            record_teacher_modeling(cfg)

    def load_datasets(self, cfg, preprocess: bool = False):
        if gold_enabled(cfg):
            place_cpu_processes_on_cpu(cfg)
        return None  # Axolotl's own dataset loading does the work

    def get_input_args(self) -> str:
        return "axolotl_gold.config.schema.GoldArgs"

    def pre_model_load(self, cfg) -> None:
        if gold_enabled(cfg):
            check_teacher_compatible(cfg)

    def post_model_load(self, cfg, model) -> None:
        if gold_enabled(cfg):
            float32_master_weights(cfg, model)

    def get_trainer_cls(self, cfg):
        if not gold_enabled(cfg):
            return None
        from axolotl_gold.trainer.gold_trainer import GoldTrainer

        return GoldTrainer

    def post_trainer_create(self, cfg, trainer) -> None:
        if not gold_enabled(cfg):
            return
        from axolotl_gold.config.settings import GoldSettings
        from axolotl_gold.models.teacher import load_teacher

        settings = GoldSettings.from_cfg(cfg)
        vision = None
        if cfg.get("processor_type"):
            from axolotl_gold.vision.setup import check_datasets, freeze_vision_tower, student_vision

            vision = student_vision(cfg, trainer.processing_class, settings)
            check_datasets(cfg, settings, trainer.train_dataset, trainer.eval_dataset)
            if not cfg.get("gold_train_vision_tower"):
                freeze_vision_tower(trainer.model)
        from axolotl_gold.models.zero3 import full_loading, zero3_enabled

        zero3 = zero3_enabled(trainer.accelerator)
        if not settings.use_uld_loss:
            check_runtime_tokens(cfg, trainer.processing_class)
        # ZeRO-3: loaded whole; the trainer partitions it in an inference engine
        with full_loading() if zero3 else contextlib.nullcontext():
            teacher = load_teacher(cfg, trainer.accelerator.device)
        objective = build_objective(cfg, settings, trainer.model, teacher, trainer.processing_class)
        trainer.setup_gold(
            settings,
            teacher,
            objective,
            trainer.processing_class,
            vision=vision,
            ds_cfg=dataset_config(cfg),
        )


def float32_master_weights(cfg, model) -> int:
    """``fp16: true`` full fine-tune: the trainable weights in float32, as AMP requires.

    Axolotl loads the model in float16 for ``fp16: true``; mixed-precision training then
    stops at its first optimizer step ("Attempting to unscale FP16 gradients", Axolotl
    issue #1031). float32 weights under float16 autocast is the AMP recipe (the forward
    still computes in float16). Adapters (their own weights are float32) and DeepSpeed /
    FSDP (their own fp16 handling) are left alone. Returns the tensors converted.
    """
    import torch

    if not cfg.get("fp16") or cfg.get("adapter") or cfg.get("deepspeed") or cfg.get("fsdp_config"):
        return 0
    converted = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
            converted += 1
    if converted:
        LOG.info("gold: %d float16 trainable tensors held in float32 for fp16 mixed precision", converted)
    return converted


def dataset_config(cfg) -> dict:
    """The first training dataset's keys (field names apply to raw image rows)."""
    datasets = cfg.get("datasets") or []
    first = datasets[0] if datasets else {}
    return dict(first) if first else {}


def place_cpu_processes_on_cpu(cfg) -> None:
    """Multi-process runs without an accelerator: load models on the CPU.

    Axolotl 0.19 maps every multi-process run to ``{"": LOCAL_RANK}``, a GPU index,
    which fails on a CPU-only machine (DDP over gloo). This hook runs after Axolotl
    normalizes the config and before any model loads.
    """
    import torch

    if (cfg.get("world_size") or 1) > 1 and str(cfg.get("device", "cpu")) == "cpu" and not torch.cuda.is_available():
        cfg.device_map = {"": "cpu"}


def build_objective(cfg, settings, student, teacher, student_tokenizer):
    """JSD for one tokenizer, ULD (or hybrid ULD) across two."""
    from axolotl_gold.scoring.objectives import JsdObjective, UldObjective

    if not settings.use_uld_loss:
        return JsdObjective(
            beta=settings.beta,
            temperature=settings.loss_temperature,
            chunk_size=settings.loss_chunk_size,
            vocab_size=shared_vocab_size(student, teacher),
            backend=cfg.get("gold_jsd_backend") or "torch",
        )
    from transformers import AutoTokenizer

    from axolotl_gold.losses.uld import ULDConfig, build_vocab_mapping
    from axolotl_gold.crosstok.teacher_inputs import CrossTokenizerInputs

    teacher_tokenizer = AutoTokenizer.from_pretrained(
        cfg.get("teacher_tokenizer") or cfg["teacher_model"],
        revision=cfg.get("teacher_model_revision"),
    )
    fallback = cfg.get("uld_alignment_fallback")
    for name, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False) and fallback is None:
            raise GoldConfigError(
                f"the {name} tokenizer ({type(tok).__name__}) gives no byte offsets, which "
                "cross-tokenizer alignment needs: use a fast tokenizer, or set "
                "`uld_alignment_fallback: positional` to pair tokens by position."
            )

    def get(key, default):
        value = cfg.get(key)
        return default if value is None else value

    inputs = CrossTokenizerInputs(
        student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        max_prompt_length=int(get("sequence_len", 2048)) - settings.max_completion_length,
        prompt_mode=get("uld_teacher_prompt", "teacher_template"),
        skip_student_eos=bool(get("uld_skip_student_eos", True)),
        skip_teacher_eos=bool(get("uld_skip_teacher_eos", True)),
        alignment_fallback=fallback,
        teacher_template_kwargs=dict(
            get("teacher_chat_template_kwargs", cfg.get("chat_template_kwargs") or {})
        ),
    )
    config = ULDConfig(
        student_temperature=float(get("uld_student_temperature", 1.0)),
        teacher_temperature=float(get("uld_teacher_temperature", 1.0)),
        merge=get("uld_token_merge_strategy", "bayesian"),
        distillation_weight=float(get("uld_distillation_weight", 1.0)),
        crossentropy_weight=float(get("uld_crossentropy_weight", 0.0)),
        hybrid_matched_weight=cfg.get("uld_hybrid_matched_weight"),
        hybrid_unmatched_weight=cfg.get("uld_hybrid_unmatched_weight"),
        hybrid_beta=settings.beta,
    )
    if cfg.get("processor_type"):
        from axolotl_gold.vision.setup import teacher_vision

        inputs.teacher_vision = teacher_vision(cfg, inputs.max_prompt_length)
    mapping = None
    if cfg.get("uld_use_hybrid_loss"):
        mapping = build_vocab_mapping(student_tokenizer, teacher_tokenizer)
    return UldObjective(inputs=inputs, config=config, mapping=mapping)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def shared_vocab_size(student, teacher) -> int | None:
    """The compared vocabulary when embedding matrices are padded differently."""
    sv = _text_config(student.config).vocab_size
    tv = _text_config(teacher.config).vocab_size
    return None if sv == tv else min(sv, tv)


def check_runtime_tokens(cfg, student_tokenizer) -> None:
    """Tokens Axolotl added to the student's tokenizer (``special_tokens``, ``tokens``)
    must be the teacher's too (same-tokenizer JSD); checked before the teacher loads."""
    from transformers import AutoTokenizer

    from axolotl_gold.config.schema import check_added_tokens, runtime_added_tokens
    from axolotl_gold.data.turns import text_tokenizer

    if not runtime_added_tokens(cfg):
        return
    teacher_tok = AutoTokenizer.from_pretrained(
        cfg.get("teacher_tokenizer") or cfg["teacher_model"],
        revision=cfg.get("teacher_model_revision"),
    )
    check_added_tokens(cfg, text_tokenizer(student_tokenizer), teacher_tok)


def check_teacher_compatible(cfg) -> None:
    """Fail before any model loads when the teacher cannot be distilled from.

    Reads only configs and tokenizers. Same-tokenizer JSD needs the same
    vocabulary on both sides; the teacher's embeddings are never resized.
    """
    from transformers import AutoConfig, AutoTokenizer

    teacher = cfg["teacher_model"]
    revision = cfg.get("teacher_model_revision")
    try:
        teacher_config = AutoConfig.from_pretrained(teacher, revision=revision)
    except (OSError, ValueError) as err:
        raise GoldConfigError(
            f"`teacher_model: {teacher}` cannot be loaded ({err}). Set `teacher_model` to "
            "a local model folder or a hub id (and `teacher_model_revision` if needed)."
        ) from err
    teacher_tok_path = cfg.get("teacher_tokenizer") or teacher
    try:
        teacher_tok = AutoTokenizer.from_pretrained(teacher_tok_path, revision=revision)
    except (OSError, ValueError) as err:
        raise GoldConfigError(
            f"the teacher tokenizer `{teacher_tok_path}` cannot be loaded ({err}): set "
            "`teacher_tokenizer` to a folder or hub id that holds the teacher's tokenizer."
        ) from err
    if cfg.get("processor_type"):
        from axolotl_gold.vision.setup import check_vision_pair

        check_vision_pair(cfg, teacher_config)
    if cfg.get("use_uld_loss"):
        return
    student_tok = AutoTokenizer.from_pretrained(
        cfg.get("tokenizer_config") or cfg["base_model"]
    )
    student_config = AutoConfig.from_pretrained(cfg.get("base_model_config") or cfg["base_model"])
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise GoldConfigError(
            "the teacher and the student use different tokenizers "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens, or the same size with "
            "different token ids), so their next-token distributions cannot be compared "
            "token by token: set `use_uld_loss: true` for cross-tokenizer distillation."
        )
    tv = _text_config(teacher_config).vocab_size
    sv = _text_config(student_config).vocab_size
    if min(tv, sv) < len(student_tok):
        raise GoldConfigError(
            f"a model's vocab_size ({min(tv, sv)}) is smaller than the tokenizer "
            f"({len(student_tok)} tokens): check `teacher_model` and `base_model`."
        )
