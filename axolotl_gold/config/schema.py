"""The GOLD keys of an Axolotl YAML, validated before any model loads.

Every key is top level and named after the reference's ``GOLDConfig`` where one
exists. None of them exists in Axolotl's core schema (checked by a test against
``AxolotlInputConfig``). GOLD is switched on by ``teacher_model``; without it the
keys are ignored and the validators do nothing, so the plugin stays inert when it
is loaded through the ``axolotl.plugins`` entry point.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from axolotl_gold.config.settings import LOSS_CHUNK_SIZE

GOLD_DATASET_TYPE = "axolotl_gold.data.chat_template"
VISION_DATASET_TYPE = "axolotl_gold.vision.chat_template"


class GoldConfigError(ValueError):
    """A GOLD configuration error; the message names the key to change."""


class GoldArgs(BaseModel):
    """GOLD settings (see the README's table for defaults and meaning)."""

    # --- teacher ---------------------------------------------------------
    teacher_model: str | None = Field(
        default=None,
        json_schema_extra={"description": "Teacher path or hub id; switches GOLD on."},
    )
    teacher_model_revision: str | None = None
    teacher_model_init_kwargs: dict[str, Any] | None = None
    teacher_tokenizer: str | None = Field(
        default=None,
        json_schema_extra={"description": "Teacher tokenizer (ULD); default: teacher_model."},
    )

    # --- on-policy mixture and divergence ----------------------------------
    lmbda: float = 0.5
    beta: float = 0.5
    loss_temperature: float = 1.0
    seq_kd: bool = False

    # --- rollouts ----------------------------------------------------------
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 128
    num_generations: int = 1
    generation_batch_size: int | None = None
    gold_seed: int | None = None

    # --- cross-tokenizer (ULD) ---------------------------------------------
    use_uld_loss: bool = False
    uld_token_merge_strategy: Literal["bayesian", "observed"] = "bayesian"
    uld_use_hybrid_loss: bool = False
    uld_hybrid_matched_weight: float | None = None
    uld_hybrid_unmatched_weight: float | None = None
    uld_crossentropy_weight: float = 0.0
    uld_distillation_weight: float = 1.0
    uld_student_temperature: float = 1.0
    uld_teacher_temperature: float = 1.0
    uld_skip_student_eos: bool = True
    uld_skip_teacher_eos: bool = True
    uld_teacher_prompt: Literal["teacher_template", "student_text"] = "teacher_template"
    uld_alignment_fallback: Literal["positional"] | None = None
    # the teacher's chat_template_kwargs (its own template); default: `chat_template_kwargs`
    teacher_chat_template_kwargs: dict[str, Any] | None = None

    # --- loss implementation -----------------------------------------------
    gold_fused_loss: bool = True
    gold_jsd_backend: Literal["torch", "liger", "auto"] = "torch"
    gold_loss_chunk_size: int = LOSS_CHUNK_SIZE

    # --- rollout engine ----------------------------------------------------
    gold_generation_engine: Literal["auto", "hf", "static"] = "auto"
    # --- vision-language students -------------------------------------------
    gold_train_vision_tower: bool = False
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False
    vllm_sync_steps: int = 1
    vllm_max_model_len: int | None = None
    vllm_server_host: str = "127.0.0.1"
    vllm_server_port: int = 8011
    vllm_server_timeout: float = 240.0

    # --- evaluation and completion logs ----------------------------------
    # evaluation samples the student on the held-out prompts (eval_loss), besides
    # scoring their dataset completions (eval_offpolicy_loss)
    gold_eval_on_policy: bool = True
    # every N optimizer steps, the window's sampled completions to gold_completions.jsonl
    gold_log_completions_steps: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _check_gold(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("teacher_model"):
            if isinstance(data, dict) and _gold_keys_without_teacher(data):
                raise GoldConfigError(
                    "GOLD keys "
                    + ", ".join(f"`{k}`" for k in _gold_keys_without_teacher(data))
                    + " are set but `teacher_model` is not: set `teacher_model` to the "
                    "teacher's path or hub id (GOLD is off without it)."
                )
            return data
        validate_gold_settings(data)
        return data


# keys whose presence only makes sense with a teacher: a GOLD YAML that forgot the teacher
_TEACHER_ONLY_KEYS = (
    "lmbda",
    "seq_kd",
    "num_generations",
    "generation_batch_size",
    "use_uld_loss",
    "teacher_model_revision",
    "teacher_tokenizer",
    "loss_temperature",
    "teacher_chat_template_kwargs",
)


def _gold_keys_without_teacher(data: dict) -> list[str]:
    uses_gold_plugin = any(
        "axolotl_gold" in str(p) for p in (data.get("plugins") or [])
    )
    if not uses_gold_plugin:
        return []  # entry-point load: stay inert whatever the YAML holds
    return [k for k in _TEACHER_ONLY_KEYS if data.get(k) is not None]


def _get(data: dict, key: str, default: Any) -> Any:
    value = data.get(key)
    return default if value is None else value


def validate_gold_settings(data: dict) -> None:
    """Raise `GoldConfigError` for a GOLD setting that cannot train.

    Works on the raw YAML dict, so it runs before any model or tokenizer loads.
    Fills in ``generation_batch_size`` when it is omitted.
    """
    for key in ("lmbda", "beta"):
        value = _get(data, key, 0.5)
        if not 0.0 <= float(value) <= 1.0:
            raise GoldConfigError(f"`{key}` must be in [0, 1], got {value}.")
    temperature = _get(data, "temperature", 1.0)
    if float(temperature) < 0:
        raise GoldConfigError(f"`temperature` must be >= 0 (0 samples greedily), got {temperature}.")
    loss_temperature = _get(data, "loss_temperature", 1.0)
    if float(loss_temperature) <= 0:
        raise GoldConfigError(f"`loss_temperature` must be > 0, got {loss_temperature}.")
    top_p = _get(data, "top_p", 1.0)
    if not 0.0 < float(top_p) <= 1.0:
        raise GoldConfigError(f"`top_p` must be in (0, 1], got {top_p}.")

    if data.get("rl"):
        raise GoldConfigError(
            f"`rl: {data['rl']}` cannot be combined with GOLD (`teacher_model` is set): "
            "remove `rl` (GOLD is its own trainer) or remove `teacher_model`."
        )
    if data.get("sample_packing"):
        raise GoldConfigError(
            "`sample_packing: true` cannot be used with GOLD: rollouts are generated per "
            "prompt and scored per sequence. Set `sample_packing: false`."
        )

    max_completion = int(_get(data, "max_completion_length", 128))
    if max_completion < 1:
        raise GoldConfigError(f"`max_completion_length` must be >= 1, got {max_completion}.")
    sequence_len = data.get("sequence_len")
    if sequence_len is not None and max_completion >= int(sequence_len):
        raise GoldConfigError(
            f"`max_completion_length` ({max_completion}) must be below `sequence_len` "
            f"({sequence_len}) so that some of the prompt fits: lower "
            "`max_completion_length` or raise `sequence_len`."
        )

    num_generations = int(_get(data, "num_generations", 1))
    if num_generations < 1:
        raise GoldConfigError(f"`num_generations` must be >= 1, got {num_generations}.")
    micro = int(_get(data, "micro_batch_size", 1))
    accum = accumulation_steps(data, micro)
    window = micro * accum
    if not data.get("gradient_accumulation_steps") and data.get("batch_size"):
        accum_key = f"`gradient_accumulation_steps` (`batch_size` {data['batch_size']} // {micro})"
    else:
        accum_key = "`gradient_accumulation_steps`"
    gen_batch = data.get("generation_batch_size")
    if gen_batch is None:
        if window % num_generations:
            raise GoldConfigError(
                f"the optimizer window `micro_batch_size` x {accum_key} = "
                f"{micro} x {accum} = {window} is not a multiple of `num_generations` "
                f"({num_generations}): change one of them so that "
                "`generation_batch_size` * `num_generations` equals the window."
            )
        data["generation_batch_size"] = window // num_generations
    elif int(gen_batch) * num_generations != window:
        raise GoldConfigError(
            f"`generation_batch_size` * `num_generations` = {gen_batch} x {num_generations} "
            f"= {int(gen_batch) * num_generations} must equal `micro_batch_size` x "
            f"{accum_key} = {micro} x {accum} = {window}: change "
            "`generation_batch_size` (or omit it to derive it) or the batch keys."
        )

    if data.get("fsdp") or data.get("fsdp_config") or data.get("fsdp_version"):
        raise GoldConfigError(
            "FSDP (`fsdp` / `fsdp_config` / `fsdp_version`) is not supported with GOLD yet: "
            "remove the FSDP keys and shard with DeepSpeed ZeRO-3 instead "
            "(`deepspeed: deepspeed_configs/zero3.json`), or train with DDP."
        )
    if _zero_stage(data.get("deepspeed")) == 3:
        _validate_zero3(data)
    if data.get("use_vllm"):
        utilization = float(_get(data, "vllm_gpu_memory_utilization", 0.3))
        if not 0.0 < utilization < 1.0:
            raise GoldConfigError(
                f"`vllm_gpu_memory_utilization` must be in (0, 1), got {utilization}: it is the "
                "share of the GPU the colocated engine takes next to the student and teacher."
            )
        if int(_get(data, "vllm_sync_steps", 1)) < 1:
            raise GoldConfigError("`vllm_sync_steps` must be >= 1.")
    if data.get("use_uld_loss") and data.get("gold_jsd_backend") in ("liger", "auto"):
        raise GoldConfigError(
            f"`gold_jsd_backend: {data['gold_jsd_backend']}` selects Liger's fused JSD kernel, "
            "which compares two distributions over one vocabulary and cannot compute the "
            "cross-tokenizer ULD loss: remove `gold_jsd_backend` or set `use_uld_loss: false`."
        )
    if data.get("use_uld_loss") and data.get("seq_kd"):
        raise GoldConfigError(
            "`seq_kd: true` with `use_uld_loss: true` is not supported yet (the teacher would "
            "sample in its own tokens): set `seq_kd: false`."
        )
    if data.get("processor_type"):
        _validate_vision(data)
    if (data.get("uld_hybrid_matched_weight") is None) != (data.get("uld_hybrid_unmatched_weight") is None):
        raise GoldConfigError(
            "set both `uld_hybrid_matched_weight` and `uld_hybrid_unmatched_weight` (fixed "
            "hybrid weights) or neither (adaptive weights)."
        )


def accumulation_steps(data: dict, micro: int) -> int:
    """Gradient accumulation: the key, else ``batch_size // micro_batch_size``."""
    accum = data.get("gradient_accumulation_steps")
    if accum:
        return int(accum)
    batch_size = data.get("batch_size")
    if not batch_size:
        return 1
    if int(batch_size) % micro:
        raise GoldConfigError(
            f"`batch_size` ({batch_size}) is not a multiple of `micro_batch_size` ({micro}): "
            "set `gradient_accumulation_steps` instead, or make `batch_size` a multiple."
        )
    return int(batch_size) // micro


def honour_batch_size(data: dict) -> dict:
    """``batch_size`` without ``gradient_accumulation_steps`` becomes accumulation steps.

    Axolotl 0.19 means to derive ``batch_size // micro_batch_size`` (``normalize_config``),
    but its schema fills ``gradient_accumulation_steps: 1`` first, so ``batch_size`` alone
    silently trains with accumulation 1. The window is the unit GOLD samples for, so the
    user's ``batch_size`` is honoured (on the raw YAML, from the plugin's ``register``;
    Axolotl refuses the two keys together, and re-derives ``batch_size`` itself).
    """
    if data.get("batch_size") and not data.get("gradient_accumulation_steps"):
        micro = int(_get(data, "micro_batch_size", 1))
        data["gradient_accumulation_steps"] = accumulation_steps(data, micro)
        data.pop("batch_size")
    return data


def _validate_zero3(data: dict) -> None:
    """What ZeRO-3 (student partitioned, teacher in an inference engine) cannot combine with."""
    if data.get("use_vllm"):
        raise GoldConfigError(
            "`use_vllm: true` with ZeRO-3 is not supported (the weight sync reads whole "
            "parameters): set `use_vllm: false` (HF generation gathers the weights once per "
            "window) or use ZeRO-1/2."
        )
    if data.get("gold_generation_engine") == "static":
        raise GoldConfigError(
            "`gold_generation_engine: static` captures CUDA graphs over the weights, which ZeRO-3 "
            "gathers anew for every window: set `gold_generation_engine: hf` (or `auto`)."
        )
    if data.get("processor_type"):
        raise GoldConfigError(
            "vision-language students (`processor_type`) are not supported with ZeRO-3 yet: "
            "use ZeRO-1/2 or DDP."
        )


def _validate_vision(data: dict) -> None:
    """A vision-language student (``processor_type`` set): the raw rows must reach
    the GOLD collator, and only engines that take images may sample."""
    if not data.get("skip_prepare_dataset"):
        raise GoldConfigError(
            "`processor_type` is set (a vision-language student), which needs "
            "`skip_prepare_dataset: true`: the rows keep their images until the GOLD "
            "collator applies the processor per micro-batch."
        )
    if data.get("remove_unused_columns") is True:
        raise GoldConfigError(
            "`remove_unused_columns: true` would drop the image rows' columns: set "
            "`remove_unused_columns: false` (or leave it unset) with `processor_type`."
        )
    if data.get("gold_generation_engine") == "static":
        raise GoldConfigError(
            "`gold_generation_engine: static` samples from token ids only and cannot take "
            "images: set `gold_generation_engine: hf` (or `auto`) for a vision-language student."
        )
    if data.get("use_vllm"):
        raise GoldConfigError(
            "`use_vllm: true` with `processor_type` (image prompts) is not supported yet: "
            "set `use_vllm: false` (HF generation samples with the images)."
        )
    if data.get("use_uld_loss") and data.get("uld_teacher_prompt") == "student_text":
        raise GoldConfigError(
            "`uld_teacher_prompt: student_text` re-tokenizes the student's prompt, whose image "
            "tokens the teacher cannot read: use `uld_teacher_prompt: teacher_template` with images."
        )
    for section in ("datasets", "test_datasets"):
        for ds in data.get(section) or []:
            kind = ds.get("type") if isinstance(ds, dict) else None
            if kind not in (None, "chat_template", VISION_DATASET_TYPE):
                raise GoldConfigError(
                    f"dataset `{ds.get('path')}` has `type: {kind}`; with `processor_type` GOLD "
                    f"reads conversations with images: set `type: {VISION_DATASET_TYPE}`."
                )


def _zero_stage(deepspeed) -> int | None:
    """The ZeRO stage of a ``deepspeed:`` value (a JSON path or an inline dict)."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, str):
        import json
        import os

        if not os.path.exists(deepspeed):
            return None  # Axolotl reports a missing file itself
        with open(deepspeed, encoding="utf-8") as f:
            deepspeed = json.load(f)
    return (deepspeed.get("zero_optimization") or {}).get("stage")


def route_chat_datasets(data: dict) -> dict:
    """Read ``type: chat_template`` datasets as GOLD prompt/completion rows.

    Called from the plugin's ``register`` hook, on the raw YAML before validation
    (a pydantic validator's rewrite of nested datasets does not survive Axolotl's
    own dataset normalization). The YAML's dataset keys (path, split, field_messages, property mappings) are kept;
    only the strategy that turns rows into prompt and completion changes.
    """
    target = VISION_DATASET_TYPE if data.get("processor_type") else GOLD_DATASET_TYPE
    for section in ("datasets", "test_datasets"):
        datasets = data.get(section) or []
        for ds in datasets:
            if isinstance(ds, dict) and ds.get("type") in (None, "chat_template"):
                ds["type"] = target
    return data


def runtime_added_tokens(cfg) -> list[tuple[str, str]]:
    """``(key, token)`` for each token Axolotl adds to the student's tokenizer at load time.

    ``special_tokens.<name>`` (``additional_special_tokens`` a list) and ``tokens``.
    """
    out = []
    special = cfg.get("special_tokens") or {}
    special = special.to_dict() if hasattr(special, "to_dict") else dict(special)
    for name, value in special.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        out += [(f"special_tokens.{name}", str(v)) for v in values if v is not None]
    out += [("tokens", str(t)) for t in cfg.get("tokens") or []]
    return out


def check_added_tokens(cfg, student_tokenizer, teacher_tokenizer) -> None:
    """Same-tokenizer JSD: each token added at run time has the same id in the teacher.

    Checked on the tokenizers as loaded (the student's after Axolotl added the tokens);
    the teacher's embeddings are never resized, so a new token has no teacher logit.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    for key, token in runtime_added_tokens(cfg):
        if teacher_vocab.get(token) is None or teacher_vocab.get(token) != student_vocab.get(token):
            raise GoldConfigError(
                f"`{key}` adds {token!r} to the student's tokenizer, which the teacher's "
                "vocabulary does not have at the same id, so the teacher has no logit for it: "
                f"remove it from `{key.split('.')[0]}`, use a token both vocabularies have, or "
                "set `use_uld_loss: true` for different vocabularies."
            )
