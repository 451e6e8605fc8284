"""The raw-YAML checks for sharded runs (DeepSpeed ZeRO-3, FSDP2): which versions and
which GOLD features combine with them, refused before any model loads with the key to
change. ``validation.validate_gold_settings`` calls them."""

from __future__ import annotations

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.schema import setting


def validate_zero3(data: dict) -> None:
    """What ZeRO-3 (student partitioned, teacher in an inference engine) cannot combine with."""
    if data.get("use_vllm"):
        raise GoldConfigError(
            "`use_vllm: true` with ZeRO-3 is not supported (the weight sync reads whole "
            "parameters): set `use_vllm: false` (HF generation gathers the weights once per "
            "window) or use ZeRO-1/2."
        )
    if data.get("processor_type"):
        raise GoldConfigError(
            "vision-language students (`processor_type`) are not supported with ZeRO-3 yet: "
            "use ZeRO-1/2 or DDP."
        )
    if data.get("adapter") and evaluates(data):
        raise GoldConfigError(
            f"evaluating a `adapter: {data['adapter']}` student under ZeRO-3 is not supported yet: "
            "the first evaluation fails inside DeepSpeed's parameter trace (\"pop from an empty "
            "deque\"; training itself runs). Set `eval_strategy: \"no\"` (or `val_set_size: 0` "
            "and no `test_datasets`), or train the adapter with FSDP2 (`fsdp_version: 2`) or DDP."
        )


def evaluates(data: dict) -> bool:
    """Whether a YAML's run evaluates: an evaluation split and a strategy other than no."""
    has_split = float(data.get("val_set_size") or 0) > 0 or bool(data.get("test_datasets"))
    return has_split and str(data.get("eval_strategy") or "steps").lower() != "no"


def fsdp_version(data: dict) -> int | None:
    """The FSDP version a YAML asks for: ``fsdp_version``, else ``fsdp_config``'s
    ``fsdp_version`` / ``version`` (Axolotl moves it up); None when unset."""
    fsdp_config = data.get("fsdp_config") or {}
    for value in (data.get("fsdp_version"), fsdp_config.get("fsdp_version"), fsdp_config.get("version")):
        if value is not None and str(value).strip():
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def validate_fsdp(data: dict) -> None:
    """FSDP2 (``fsdp_version: 2`` with ``fsdp_config``) shards the student as Axolotl does
    for SFT and the teacher for inference; FSDP1 and what FSDP2 cannot combine with yet
    are refused here, before any model loads."""
    version = fsdp_version(data)
    if version != 2:
        if data.get("fsdp") and not data.get("fsdp_config"):
            key = f"`fsdp: {data['fsdp']}` (FSDP1's list of options)"
        elif version is None:
            key = "`fsdp_config` without `fsdp_version` (Axolotl then runs FSDP1)"
        else:
            key = f"`fsdp_version: {version}`"
        raise GoldConfigError(
            f"{key} is not supported with GOLD: FSDP1 is deprecated (Axolotl and "
            "transformers are removing it). Set `fsdp_version: 2` with an `fsdp_config` "
            "(e.g. `fsdp_config: {auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
            "state_dict_type: FULL_STATE_DICT}`), or shard with DeepSpeed ZeRO-3 "
            "(`deepspeed: deepspeed_configs/zero3.json`)."
        )
    if not data.get("fsdp_config"):
        raise GoldConfigError(
            "`fsdp_version: 2` needs an `fsdp_config` (Axolotl turns FSDP on from it): add e.g. "
            "`fsdp_config: {auto_wrap_policy: TRANSFORMER_BASED_WRAP, state_dict_type: FULL_STATE_DICT}`."
        )
    if data.get("deepspeed"):
        raise GoldConfigError("`deepspeed` and `fsdp_config` cannot be combined: choose one.")
    if data.get("use_vllm"):
        mode = setting(data, "vllm_mode")
        raise GoldConfigError(
            f"`use_vllm: true` (`vllm_mode: {mode}`) with FSDP2 is not supported yet (the engine "
            "reads whole parameters; FSDP2 holds shards): set `use_vllm: false` (HF generation "
            "gathers the student once per window)."
        )
    if data.get("processor_type"):
        raise GoldConfigError(
            "vision-language students (`processor_type`) are not supported with FSDP2 yet: "
            "train them with DDP."
        )


def zero_stage(deepspeed) -> int | None:
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
