"""The GOLD keys of an Axolotl YAML: names, types and the one place their defaults live.

Every key is top level and named after the reference's ``GOLDConfig`` where one
exists. None of them exists in Axolotl's core schema (checked by a test against
``AxolotlInputConfig``). GOLD is switched on by ``teacher_model``; without it the
keys are ignored and the validators do nothing, so the plugin stays inert when it
is loaded through the ``axolotl.plugins`` entry point.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from axolotl_gold.config.errors import GoldConfigError

GOLD_DATASET_TYPE = "axolotl_gold.data.chat_template"
VISION_DATASET_TYPE = "axolotl_gold.vision.chat_template"
# dataset types of earlier releases, still accepted (rewritten in the plugin's `register`)
LEGACY_DATASET_TYPES = {
    "axolotl_gold.chat_template": GOLD_DATASET_TYPE,
    "axolotl_gold.vision_chat": VISION_DATASET_TYPE,
}

# Tokens per chunk of the fused JSD. 512: its buffers sit on top of the student's saved
# activations at a step's peak. `axolotl train` on an H100 at 1024 (bench_cli.py
# --memory-at-peak, fourteenth session): step peak 15.71 GiB, of which the loss's grouped logit
# gradients ([2 x chunk, V] bf16) 0.58 and the teacher's chunk of logits ([chunk, V] bf16) 0.29
# for a 151,936-token head; both halve at 512 (-0.44 GiB, predicted from that split). Speed:
# H100 bench_jsd_loss.py 12.0 vs 11.4 ms per loss step at 1024 vs 2048; H200
# profile_student_step.py the loss stage of an optimizer step 34.0 vs 32.5 ms, ~0.1% of it.
LOSS_CHUNK_SIZE = 512

# Axolotl keys GOLD reads, where a raw (not yet validated) YAML may lack them
AXOLOTL_FALLBACKS = {
    "micro_batch_size": 1,
    "sequence_len": 2048,
    "seed": 42,
    "base_model": "",
    "chat_template_kwargs": None,
}


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
    # FSDP2: the teacher whole on every GPU (it fits) instead of sharded for inference
    gold_teacher_replicate: bool = False
    # a teacher server (`python -m axolotl_gold.models.teacher_server`): the teacher runs
    # there, `teacher_model` then supplies its config, tokenizer and output head only
    teacher_server_url: str | None = None
    teacher_server_timeout: float = 120.0  # seconds per request
    # exact: our server, final hidden states (full-vocabulary loss); prompt_logprobs: a vLLM
    # OpenAI-compatible server's top-k log-probs plus a tail bucket (losses/topk_tail.py)
    teacher_server_mode: Literal["exact", "prompt_logprobs"] = "exact"
    teacher_server_top_k: int = 20  # prompt_logprobs: ids per position (vLLM's --max-logprobs caps it)
    teacher_server_retries: int = 3  # tries per request (connection errors, timeouts, 5xx)
    # several teacher servers, by name (instead of `teacher_server_url`); each row's
    # `teacher_column` names the one that scores its rollouts
    teacher_servers: dict[str, str] | None = None
    # per teacher name, the checkpoint its server serves (exact mode: the trainer reads its
    # output head there); a name not listed serves `teacher_model`
    teacher_models: dict[str, str] | None = None
    teacher_column: str = "teacher"  # the dataset column naming each row's teacher

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
    # scoring batches' prompt and completion widths rounded up to a multiple of this (masked,
    # unscored padding: the same loss from fewer distinct shapes for a compiled student);
    # default 1 (no rounding)
    gold_scoring_width_multiple: int | None = None

    # --- rollout engine ----------------------------------------------------
    gold_generation_engine: Literal["auto", "hf", "static"] = "auto"
    # the static engine's decode step through torch.compile (fused kernels; a one-time
    # compile per batch and cache-length bucket, about a minute each on a 0.5B model)
    gold_rollout_compile: bool = False
    # the static engine's decode steps run each layer's q/k/v and gate/up projections as one
    # GEMM each, on a copy of those weights refreshed per call (plain nn.Linear, and peft's
    # plain LoRA layers: their A matrices as one more GEMM a group); memory for the copies.
    # Default: as gold_rollout_compile
    gold_rollout_fuse_projections: bool | None = None
    # rows the local engines (static, hf) decode at once; default: as many as fit in half
    # the free device memory. With more prompts, the static engine refills stopped rows' slots
    gold_generation_rows: int | None = None
    # --- vision-language students -------------------------------------------
    gold_train_vision_tower: bool = False
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False
    vllm_sync_steps: int = 1
    vllm_max_model_len: int | None = None
    # false: vLLM captures CUDA graphs (colocate; the server takes --enforce-eager)
    vllm_enforce_eager: bool = False
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
        from axolotl_gold.config.validation import gold_keys_without_teacher, validate_gold_settings

        if not isinstance(data, dict) or not data.get("teacher_model"):
            if isinstance(data, dict) and gold_keys_without_teacher(data):
                raise GoldConfigError(
                    "GOLD keys "
                    + ", ".join(f"`{k}`" for k in gold_keys_without_teacher(data))
                    + " are set but `teacher_model` is not: set `teacher_model` to the "
                    "teacher's path or hub id (GOLD is off without it)."
                )
            return data
        validate_gold_settings(data)
        return data


def gold_defaults() -> dict[str, Any]:
    """Every GOLD key and its default: the one place defaults are written."""
    return {name: field.default for name, field in GoldArgs.model_fields.items()}


def setting(data, key: str) -> Any:
    """``data[key]``, or its default when unset (None): ``GoldArgs``' for a GOLD key,
    ``AXOLOTL_FALLBACKS``' for an Axolotl key."""
    value = data.get(key)
    if value is not None:
        return value
    defaults = gold_defaults()
    return defaults[key] if key in defaults else AXOLOTL_FALLBACKS[key]


