"""Checks on the raw YAML that run before any model loads, and the rewrites the plugin
applies to it in ``register`` (dataset types, ``batch_size``).

Every GOLD default is read from ``GoldArgs`` (``gold_defaults``); the Axolotl keys this
module reads fall back to ``AXOLOTL_FALLBACKS``.
"""

from __future__ import annotations

from typing import Any

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.schema import (
    GOLD_DATASET_TYPE,
    LEGACY_DATASET_TYPES,
    VISION_DATASET_TYPE,
    setting,
)
from axolotl_gold.config.sharding_checks import validate_fsdp, validate_zero3, zero_stage
from axolotl_gold.config.teacher_server_checks import validate_teacher_servers

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
    "gold_teacher_replicate",
    "teacher_server_url",
    "teacher_servers",
    "teacher_models",
)


def gold_keys_without_teacher(data: dict) -> list[str]:
    uses_gold_plugin = any(
        "axolotl_gold" in str(p) for p in (data.get("plugins") or [])
    )
    if not uses_gold_plugin:
        return []  # entry-point load: stay inert whatever the YAML holds
    return [k for k in _TEACHER_ONLY_KEYS if data.get(k) is not None]


# Axolotl's `torch_compile_mode` values whose inductor settings record CUDA graphs (cudagraph
# trees) of the compiled student
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def graphed_compile(torch_compile: bool | None, mode: str | None) -> bool:
    """Whether Axolotl's ``torch_compile`` / ``torch_compile_mode`` record CUDA graphs of the student."""
    return bool(torch_compile) and mode in GRAPHED_COMPILE_MODES


def validate_gold_settings(data: dict) -> None:
    """Raise `GoldConfigError` for a GOLD setting that cannot train.

    Works on the raw YAML dict, so it runs before any model or tokenizer loads.
    Fills in ``generation_batch_size`` when it is omitted.
    """
    for key in ("lmbda", "beta"):
        value = setting(data, key)
        if not 0.0 <= float(value) <= 1.0:
            raise GoldConfigError(f"`{key}` must be in [0, 1], got {value}.")
    temperature = setting(data, "temperature")
    if float(temperature) < 0:
        raise GoldConfigError(f"`temperature` must be >= 0 (0 samples greedily), got {temperature}.")
    loss_temperature = setting(data, "loss_temperature")
    if float(loss_temperature) <= 0:
        raise GoldConfigError(f"`loss_temperature` must be > 0, got {loss_temperature}.")
    top_p = setting(data, "top_p")
    if not 0.0 < float(top_p) <= 1.0:
        raise GoldConfigError(f"`top_p` must be in (0, 1], got {top_p}.")
    rows = data.get("gold_generation_rows")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise GoldConfigError(
            f"`gold_generation_rows` must be a whole number >= 1 (rows decoded at once), got {rows!r}: "
            "set it, or remove it to decode as many rows as fit in memory."
        )

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

    max_completion = int(setting(data, "max_completion_length"))
    if max_completion < 1:
        raise GoldConfigError(f"`max_completion_length` must be >= 1, got {max_completion}.")
    sequence_len = data.get("sequence_len")
    if sequence_len is not None and max_completion >= int(sequence_len):
        raise GoldConfigError(
            f"`max_completion_length` ({max_completion}) must be below `sequence_len` "
            f"({sequence_len}) so that some of the prompt fits: lower "
            "`max_completion_length` or raise `sequence_len`."
        )

    num_generations = int(setting(data, "num_generations"))
    if num_generations < 1:
        raise GoldConfigError(f"`num_generations` must be >= 1, got {num_generations}.")
    micro = int(setting(data, "micro_batch_size"))
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

    validate_teacher_servers(data)
    for key in ("gold_rollout_compile", "gold_rollout_fuse_projections"):
        if data.get(key):
            _validate_static_engine_key(data, key)
    _validate_teacher_placement(data)
    if data.get("fsdp") or data.get("fsdp_config") or data.get("fsdp_version"):
        validate_fsdp(data)
    if zero_stage(data.get("deepspeed")) == 3:
        validate_zero3(data)
    if data.get("use_vllm"):
        utilization = float(setting(data, "vllm_gpu_memory_utilization"))
        if not 0.0 < utilization < 1.0:
            raise GoldConfigError(
                f"`vllm_gpu_memory_utilization` must be in (0, 1), got {utilization}: it is the "
                "share of the GPU the colocated engine takes next to the student and teacher."
            )
        if int(setting(data, "vllm_sync_steps")) < 1:
            raise GoldConfigError("`vllm_sync_steps` must be >= 1.")
    if data.get("use_uld_loss") and data.get("gold_jsd_backend") in ("liger", "auto"):
        raise GoldConfigError(
            f"`gold_jsd_backend: {data['gold_jsd_backend']}` selects Liger's fused JSD kernel, "
            "which compares two distributions over one vocabulary and cannot compute the "
            "cross-tokenizer ULD loss: remove `gold_jsd_backend` or set `use_uld_loss: false`."
        )
    multiple = data.get("gold_scoring_width_multiple")
    if multiple is not None and int(multiple) < 1:
        raise GoldConfigError(f"`gold_scoring_width_multiple` must be >= 1 (1: no rounding), got {multiple}.")
    if data.get("use_uld_loss") and data.get("gold_fused_loss") is False:
        raise GoldConfigError(
            "`gold_fused_loss: false` with `use_uld_loss: true`: the ULD loss applies both output "
            "heads itself, chunk by chunk (it has no path from full logits): remove "
            "`gold_fused_loss` or set `use_uld_loss: false`."
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
        micro = int(setting(data, "micro_batch_size"))
        data["gradient_accumulation_steps"] = accumulation_steps(data, micro)
        data.pop("batch_size")
    return data


def _validate_teacher_placement(data: dict) -> None:
    """A quantized or ``device_map``-placed teacher is held whole by one process."""
    kwargs = data.get("teacher_model_init_kwargs") or {}
    keys = [k for k in ("quantization_config", "device_map", "load_in_4bit", "load_in_8bit") if kwargs.get(k)]
    if not keys:
        return
    sharded = (
        "ZeRO-3" if zero_stage(data.get("deepspeed")) == 3
        else "FSDP" if (data.get("fsdp") or data.get("fsdp_config") or data.get("fsdp_version")) else None
    )
    if sharded:
        raise GoldConfigError(
            f"`teacher_model_init_kwargs` {', '.join(f'`{k}`' for k in keys)} with {sharded}: a "
            f"quantized or device_map-placed teacher cannot be partitioned by {sharded}. Remove "
            f"{', '.join(f'`teacher_model_init_kwargs.{k}`' for k in keys)}, or train without "
            f"{sharded} (DDP / ZeRO-1/2 hold the quantized teacher whole on each GPU)."
        )


def _validate_static_engine_key(data: dict, key: str) -> None:
    """``gold_rollout_compile`` / ``gold_rollout_fuse_projections`` change the static engine's
    decode step: refused where that engine does not sample."""
    if data.get("gold_generation_engine") == "hf":
        blocker = "`gold_generation_engine: hf` (HF generate samples)"
    elif data.get("use_vllm"):
        blocker = "`use_vllm: true` (vLLM samples, with its own CUDA graphs)"
    elif data.get("processor_type") and data.get("gold_generation_engine") != "static":
        blocker = ("a vision-language student (`processor_type`) under `gold_generation_engine: auto` "
                   "(HF generate samples with the images; set `gold_generation_engine: static`)")
    else:
        return
    raise GoldConfigError(
        f"`{key}: true` changes the static engine's decode step, which does not run with "
        f"{blocker}: remove `{key}`."
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
            if not isinstance(ds, dict):
                continue
            if ds.get("type") in (None, "chat_template"):
                ds["type"] = target
            elif ds.get("type") in LEGACY_DATASET_TYPES:  # the names before 0.2's layout
                ds["type"] = LEGACY_DATASET_TYPES[ds["type"]]
    return data
