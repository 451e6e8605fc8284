"""Config validation through Axolotl's real loader: errors name the key to change."""

from pathlib import Path

import pytest

from axolotl_run import with_overrides

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.schema import GoldArgs
from axolotl_gold.config.validation import validate_gold_settings


def _cfg(tiny_pair, tmp_path, **overrides):
    cfg = {
        "base_model": tiny_pair["student"],
        "plugins": ["axolotl_gold.GoldPlugin"],
        "teacher_model": tiny_pair["teacher"],
        "datasets": [{"path": tiny_pair["train"], "ds_type": "json", "type": "chat_template"}],
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_generations": 2,
        "max_completion_length": 16,
        "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out"),
        "bf16": False,
    }
    return with_overrides(cfg, overrides)


def _validate(cfg):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_valid_config_derives_generation_batch_size_and_routes_dataset(tiny_pair, tmp_path):
    out = _validate(_cfg(tiny_pair, tmp_path))
    assert out.generation_batch_size == 2
    assert out.datasets[0]["type"] == "axolotl_gold.data.chat_template"
    assert out.lmbda == 0.5 and out.beta == 0.5


def test_zero3_config_is_accepted(tiny_pair, tmp_path):
    zero3 = Path(__file__).resolve().parents[1] / "deepspeed_configs" / "zero3.json"
    assert _validate(_cfg(tiny_pair, tmp_path, deepspeed=str(zero3))).deepspeed


def test_torch_compile_with_and_without_cuda_graphs_is_accepted(tiny_pair, tmp_path):
    for mode in (None, "default", "reduce-overhead", "max-autotune"):
        cfg = _validate(_cfg(tiny_pair, tmp_path, torch_compile=True, torch_compile_mode=mode))
        assert cfg.torch_compile and cfg.torch_compile_mode == mode


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"generation_batch_size": 3}, r"3 x 2 = 6 must equal `micro_batch_size` x `gradient_accumulation_steps` = 2 x 2 = 4"),
        ({"num_generations": 3}, r"not a multiple of `num_generations`"),
        ({"lmbda": 1.5}, r"`lmbda` must be in \[0, 1\]"),
        ({"beta": -0.1}, r"`beta` must be in \[0, 1\]"),
        ({"max_completion_length": 64}, r"`max_completion_length` \(64\) must be below `sequence_len` \(64\)"),
        ({"teacher_model": None}, r"`teacher_model` is not"),
        ({"sample_packing": True}, r"Set `sample_packing: false`"),
        ({"rl": "dpo"}, r"remove `rl`"),
        ({"temperature": -1.0}, r"`temperature` must be >= 0"),
        ({"use_uld_loss": True, "gold_jsd_backend": "liger"}, r"`gold_jsd_backend: liger` selects Liger's fused JSD"),
        ({"use_uld_loss": True, "seq_kd": True}, r"set `seq_kd: false`"),
        ({"use_uld_loss": True, "gold_fused_loss": False}, r"remove `gold_fused_loss` or set `use_uld_loss: false`"),
        ({"gold_scoring_width_multiple": 0}, r"`gold_scoring_width_multiple` must be >= 1"),
        ({"uld_hybrid_matched_weight": 0.5}, r"set both `uld_hybrid_matched_weight`"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "use_vllm": True},
            r"`use_vllm: true` with ZeRO-3",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}, "adapter": "lora", "lora_r": 4,
             "lora_alpha": 8, "lora_target_linear": True, "val_set_size": 0.25},
            r"evaluating a `adapter: lora` student under ZeRO-3.*`eval_strategy: \"no\"`",
        ),
        ({"loss_temperature": 0.0}, r"`loss_temperature` must be > 0"),
        ({"gold_generation_rows": 0}, r"`gold_generation_rows` must be a whole number >= 1"),
        ({"gold_generation_rows": 2.5}, r"`gold_generation_rows` must be a whole number >= 1"),
        ({"gold_rollout_compile": True, "gold_generation_engine": "hf"}, r"`gold_generation_engine: hf`.*remove `gold_rollout_compile`"),
        ({"gold_rollout_compile": True, "use_vllm": True}, r"`use_vllm: true`.*remove `gold_rollout_compile`"),
        ({"gold_rollout_fuse_projections": True, "gold_generation_engine": "hf"},
         r"`gold_generation_engine: hf`.*remove `gold_rollout_fuse_projections`"),
    ],
)
def test_bad_config_fails_with_the_key(tiny_pair, tmp_path, overrides, pattern):
    with pytest.raises(Exception, match=pattern):
        _validate(_cfg(tiny_pair, tmp_path, **overrides))


def test_inert_without_teacher_and_without_plugin_keys():
    """Loaded through the entry point, a plain YAML is untouched."""
    data = {"base_model": "x", "sample_packing": True, "micro_batch_size": 3}
    assert GoldArgs.model_validate(data).teacher_model is None
    assert "generation_batch_size" not in data


def test_gold_keys_do_not_collide_with_axolotl_core():
    from axolotl.utils.schemas.config import AxolotlInputConfig

    collisions = set(GoldArgs.model_fields) & set(AxolotlInputConfig.model_fields)
    assert not collisions


def test_vocab_mismatch_without_uld_fails_before_model_load(tiny_cross_pair):
    from axolotl.utils.dict import DictDefault

    from axolotl_gold.models.compatibility import check_teacher_compatible

    cfg = DictDefault(base_model=tiny_cross_pair["student"], teacher_model=tiny_cross_pair["teacher"])
    with pytest.raises(GoldConfigError, match="set `use_uld_loss: true`"):
        check_teacher_compatible(cfg)
    cfg["use_uld_loss"] = True
    check_teacher_compatible(cfg)  # allowed with ULD


def test_missing_teacher_path_names_the_key(tiny_pair, tmp_path):
    from axolotl.utils.dict import DictDefault

    from axolotl_gold.models.compatibility import check_teacher_compatible

    cfg = DictDefault(base_model=tiny_pair["student"], teacher_model=str(tmp_path / "nope"))
    with pytest.raises(GoldConfigError, match="`teacher_model: .*` cannot be loaded"):
        check_teacher_compatible(cfg)


def test_validate_gold_settings_fills_generation_batch_size():
    data = {"micro_batch_size": 4, "gradient_accumulation_steps": 3, "num_generations": 4}
    validate_gold_settings(data)
    assert data["generation_batch_size"] == 3


def test_uld_tokenizer_without_offsets_needs_a_fallback(tiny_cross_pair):
    from axolotl.utils.dict import DictDefault
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizer

    from axolotl_gold.assembly import build_objective
    from axolotl_gold.config.settings import GoldSettings

    class SlowTokenizer(PreTrainedTokenizer):  # a tokenizer with no offset mapping
        is_fast = False

    student_tok = AutoTokenizer.from_pretrained(tiny_cross_pair["student"])
    slow = SlowTokenizer.__new__(SlowTokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_cross_pair["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_cross_pair["teacher"])
    cfg = DictDefault(
        teacher_model=tiny_cross_pair["teacher"], use_uld_loss=True, sequence_len=64, max_completion_length=16
    )
    settings = GoldSettings.from_cfg(cfg)
    with pytest.raises(GoldConfigError, match="`uld_alignment_fallback: positional`"):
        build_objective(settings, model, teacher, slow)
    assert build_objective(settings, model, teacher, student_tok).inputs is not None


def test_batch_size_key_sets_the_window_as_axolotl_derives_it(tiny_pair, tmp_path):
    # micro 4 with batch_size 32 is accumulation 8, a window of 32 (Axolotl 0.19's schema
    # default of 1 would otherwise win and train with accumulation 1)
    cfg = _cfg(tiny_pair, tmp_path, micro_batch_size=4, gradient_accumulation_steps=None,
               batch_size=32, num_generations=8)
    out = _validate(cfg)
    assert out["gradient_accumulation_steps"] == 8
    assert out["generation_batch_size"] == 4
    for batch_size, key in ((10, "batch_size"), (12, "gradient_accumulation_steps")):
        bad = _cfg(tiny_pair, tmp_path, micro_batch_size=4, gradient_accumulation_steps=None,
                   batch_size=batch_size, num_generations=8)
        with pytest.raises(ValueError, match=key):
            _validate(bad)


FSDP2 = {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}


def test_fsdp2_config_is_accepted(tiny_pair, tmp_path):
    out = _validate(_cfg(tiny_pair, tmp_path, **FSDP2, gold_teacher_replicate=True))
    assert str(out.fsdp_version) == "2" and out.gold_teacher_replicate is True
    # the version inside fsdp_config counts too
    nested = {"fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    assert str(_validate(_cfg(tiny_pair, tmp_path, **nested)).fsdp_version) == "2"


@pytest.mark.parametrize("keys,pattern", [
    ({"fsdp": ["full_shard", "auto_wrap"]}, r"`fsdp: \['full_shard', 'auto_wrap'\]`"),
    ({"fsdp_version": 1, "fsdp_config": {"offload_params": False}}, r"`fsdp_version: 1`"),
    ({"fsdp_config": {"offload_params": False}}, r"`fsdp_config` without `fsdp_version`"),
])
def test_fsdp1_is_refused_naming_the_key(tiny_pair, tmp_path, keys, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        _validate(_cfg(tiny_pair, tmp_path, **keys))
    assert "fsdp_version: 2" in str(err.value)


@pytest.mark.parametrize("overrides,pattern", [
    ({"use_vllm": True}, r"`use_vllm: true` \(`vllm_mode: colocate`\) with FSDP2"),
    ({"use_vllm": True, "vllm_mode": "server"}, r"`vllm_mode: server`\) with FSDP2"),
    ({"processor_type": "AutoProcessor", "skip_prepare_dataset": True}, r"`processor_type`.*FSDP2"),
])
def test_fsdp2_refuses_what_it_cannot_run_before_loading(tiny_pair, tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _validate(_cfg(tiny_pair, tmp_path, **FSDP2, **overrides))


@pytest.mark.parametrize("sharded", ["fsdp2", "zero3"])
@pytest.mark.parametrize("engine", ["static", "auto"])
def test_sharded_runs_take_the_static_engine(tiny_pair, tmp_path, sharded, engine):
    # FSDP2's hooks are set aside while the gathered student samples (`generation_weights`),
    # DeepSpeed's are taken off by its `unwrap_model_for_generation`: the static engine (and
    # its compiled step) samples under both, as `auto` picks on CUDA
    keys = FSDP2 if sharded == "fsdp2" else {"deepspeed": {"zero_optimization": {"stage": 3}}}
    cfg = _validate(_cfg(tiny_pair, tmp_path, **keys, gold_generation_engine=engine, gold_rollout_compile=True))
    assert cfg.gold_generation_engine == engine and cfg.gold_rollout_compile


def test_fsdp_version_reader():
    from axolotl_gold.config.sharding_checks import fsdp_version

    assert fsdp_version({}) is None
    assert fsdp_version({"fsdp_version": "2"}) == 2
    assert fsdp_version({"fsdp_config": {"fsdp_version": 2}}) == 2
    assert fsdp_version({"fsdp_config": {"version": 1}}) == 1


@pytest.mark.parametrize(
    "given,vision,expected",
    [
        (None, False, "axolotl_gold.data.chat_template"),
        ("chat_template", False, "axolotl_gold.data.chat_template"),
        ("axolotl_gold.chat_template", False, "axolotl_gold.data.chat_template"),  # before 0.2's layout
        ("chat_template", True, "axolotl_gold.vision.chat_template"),
        ("axolotl_gold.vision_chat", True, "axolotl_gold.vision.chat_template"),
        ("alpaca", False, "alpaca"),  # not ours: left for Axolotl (and its own error)
    ],
)
def test_dataset_types_route_to_the_gold_strategies(given, vision, expected):
    from axolotl_gold.config.validation import route_chat_datasets

    ds = {"path": "x.jsonl"} | ({"type": given} if given else {})
    data = {"datasets": [ds], "test_datasets": [dict(ds)]} | ({"processor_type": "AutoProcessor"} if vision else {})
    route_chat_datasets(data)
    assert [d["type"] for d in data["datasets"] + data["test_datasets"]] == [expected, expected]


def test_settings_take_every_default_from_the_schema():
    """GoldSettings of a YAML without GOLD keys holds GoldArgs' defaults (one place)."""
    from axolotl_gold.config.schema import gold_defaults
    from axolotl_gold.config.settings import GoldSettings

    defaults = gold_defaults()
    settings = GoldSettings.from_cfg({"teacher_model": "t", "seed": 3})
    assert settings.lmbda == defaults["lmbda"] and settings.beta == defaults["beta"]
    assert settings.max_completion_length == defaults["max_completion_length"]
    assert settings.uld.merge == defaults["uld_token_merge_strategy"]
    assert settings.vllm.server_url.endswith(f":{defaults['vllm_server_port']}")
    assert settings.seed == 3 and settings.teacher.tokenizer == "t"
    assert GoldSettings.from_cfg({"teacher_model": "t", "gold_seed": 9, "seed": 3}).seed == 9
