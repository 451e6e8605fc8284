"""The one settings object a GOLD run is built from (plain dataclasses, no axolotl).

``GoldSettings.from_cfg`` reads the validated config once; every default comes from
``GoldArgs`` (``config.schema``), so no module below repeats one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.config.schema import setting
from axolotl_gold.config.sharding_checks import fsdp_version, zero_stage
from axolotl_gold.config.validation import graphed_compile


@dataclass(frozen=True)
class TeacherSettings:
    model: str
    revision: str | None
    tokenizer: str  # the teacher's tokenizer (or processor) path; default: the model's
    dtype: str  # "bfloat16" | "float16" | "float32"
    init_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherServerSettings:
    """``teacher_server_url`` and its keys: the teacher runs in a teacher server; or
    ``teacher_servers``: several, by name, each row's ``column`` naming its teacher."""

    url: str | None
    timeout: float
    retries: int
    mode: str = "exact"  # or "prompt_logprobs": top-k + tail from a vLLM server
    top_k: int = 20
    servers: dict = field(default_factory=dict)  # teacher name -> URL
    models: dict = field(default_factory=dict)  # teacher name -> checkpoint (default teacher_model)
    column: str = "teacher"
    # the keys an error about this server names (one of several: `teacher_servers.<name>`)
    url_key: str = "teacher_server_url"
    model_key: str = "teacher_model"

    @property
    def enabled(self) -> bool:
        return bool(self.url or self.servers)


@dataclass(frozen=True)
class UldSettings:
    """Cross-tokenizer distillation (``use_uld_loss``): the ``uld_*`` keys."""

    merge: str
    hybrid: bool
    hybrid_matched_weight: float | None
    hybrid_unmatched_weight: float | None
    crossentropy_weight: float
    distillation_weight: float
    student_temperature: float
    teacher_temperature: float
    skip_student_eos: bool
    skip_teacher_eos: bool
    teacher_prompt: str
    alignment_fallback: str | None
    teacher_template_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VllmSettings:
    """``use_vllm`` and the ``vllm_*`` keys."""

    enabled: bool
    mode: str
    gpu_memory_utilization: float
    tensor_parallel_size: int
    enable_sleep_mode: bool
    sync_steps: int
    max_model_len: int | None
    enforce_eager: bool
    dtype: str  # the precision the student trains in
    server_url: str
    server_timeout: float


@dataclass(frozen=True)
class GoldSettings:
    teacher: TeacherSettings
    student_path: str
    lmbda: float
    beta: float
    loss_temperature: float
    seq_kd: bool
    temperature: float
    top_p: float
    top_k: int
    max_completion_length: int
    sequence_len: int
    num_generations: int
    generation_batch_size: int | None
    seed: int
    chat_template_kwargs: dict
    fused_loss: bool
    loss_chunk_size: int
    scoring_width_multiple: int  # scoring batches' widths rounded up to multiples of it
    jsd_backend: str
    use_uld_loss: bool
    uld: UldSettings
    generation_engine: str
    rollout_compile: bool  # the static engine's decode step through torch.compile
    rollout_fuse_projections: bool  # the static engine's decode step: q/k/v and gate/up as one GEMM each
    generation_rows: int | None  # rows the local engines decode at once (None: as many as fit)
    vision: bool  # a vision-language student (``processor_type`` set)
    train_vision_tower: bool
    vllm: VllmSettings
    eval_on_policy: bool
    log_completions_steps: int
    teacher_replicate: bool  # FSDP2: the teacher whole on every device, not sharded
    teacher_server: TeacherServerSettings

    @property
    def max_prompt_length(self) -> int:
        return self.sequence_len - self.max_completion_length

    def per_teacher(self) -> dict[str, "GoldSettings"]:
        """``teacher_servers``: per teacher name, these settings with its server as the one
        ``teacher_server_url`` (and its checkpoint as ``teacher_model``); the tokenizer is shared."""
        out = {}
        server = self.teacher_server
        for name, url in server.servers.items():
            own = name in server.models  # its own checkpoint (`teacher_model_revision` is not its)
            teacher = replace(self.teacher, model=server.models[name], revision=None) if own else self.teacher
            out[name] = replace(
                self,
                teacher=teacher,
                teacher_server=replace(
                    server, url=url, servers={}, url_key=f"teacher_servers.{name}",
                    model_key=f"teacher_models.{name}" if own else "teacher_model",
                ),
            )
        return out

    @classmethod
    def from_cfg(cls, cfg) -> "GoldSettings":
        """From the validated config (a dict or Axolotl's ``DictDefault``)."""

        def get(key):
            return setting(cfg, key)

        template_kwargs = dict(get("chat_template_kwargs") or {})
        teacher_model = get("teacher_model") or ""
        return cls(
            teacher=TeacherSettings(
                model=teacher_model,
                revision=get("teacher_model_revision"),
                tokenizer=get("teacher_tokenizer") or teacher_model,
                dtype=teacher_dtype(cfg),
                init_kwargs=dict(get("teacher_model_init_kwargs") or {}),
            ),
            student_path=str(get("base_model")),
            lmbda=float(get("lmbda")),
            beta=float(get("beta")),
            loss_temperature=float(get("loss_temperature")),
            seq_kd=bool(get("seq_kd")),
            temperature=float(get("temperature")),
            top_p=float(get("top_p")),
            top_k=int(get("top_k")),
            max_completion_length=int(get("max_completion_length")),
            sequence_len=int(get("sequence_len")),
            num_generations=int(get("num_generations")),
            generation_batch_size=get("generation_batch_size"),
            seed=int(cfg.get("gold_seed") if cfg.get("gold_seed") is not None else get("seed")),
            chat_template_kwargs=template_kwargs,
            fused_loss=bool(get("gold_fused_loss")),
            loss_chunk_size=int(get("gold_loss_chunk_size")),
            scoring_width_multiple=scoring_width_multiple(cfg),
            jsd_backend=str(get("gold_jsd_backend")),
            use_uld_loss=bool(get("use_uld_loss")),
            uld=UldSettings(
                merge=str(get("uld_token_merge_strategy")),
                hybrid=bool(get("uld_use_hybrid_loss")),
                hybrid_matched_weight=get("uld_hybrid_matched_weight"),
                hybrid_unmatched_weight=get("uld_hybrid_unmatched_weight"),
                crossentropy_weight=float(get("uld_crossentropy_weight")),
                distillation_weight=float(get("uld_distillation_weight")),
                student_temperature=float(get("uld_student_temperature")),
                teacher_temperature=float(get("uld_teacher_temperature")),
                skip_student_eos=bool(get("uld_skip_student_eos")),
                skip_teacher_eos=bool(get("uld_skip_teacher_eos")),
                teacher_prompt=str(get("uld_teacher_prompt")),
                alignment_fallback=get("uld_alignment_fallback"),
                teacher_template_kwargs=dict(get("teacher_chat_template_kwargs") or template_kwargs),
            ),
            generation_engine=str(get("gold_generation_engine")),
            rollout_compile=bool(get("gold_rollout_compile")),
            rollout_fuse_projections=fuse_projections(cfg, get("gold_rollout_fuse_projections")),
            generation_rows=get("gold_generation_rows"),
            vision=bool(cfg.get("processor_type")),
            train_vision_tower=bool(get("gold_train_vision_tower")),
            vllm=VllmSettings(
                enabled=bool(get("use_vllm")),
                mode=str(get("vllm_mode")),
                gpu_memory_utilization=float(get("vllm_gpu_memory_utilization")),
                tensor_parallel_size=int(get("vllm_tensor_parallel_size")),
                enable_sleep_mode=bool(get("vllm_enable_sleep_mode")),
                sync_steps=int(get("vllm_sync_steps")),
                max_model_len=cfg.get("vllm_max_model_len") or cfg.get("sequence_len"),
                enforce_eager=bool(get("vllm_enforce_eager")),
                dtype="bfloat16" if cfg.get("bf16") is True else "float16" if cfg.get("fp16") else "float32",
                server_url=f"http://{get('vllm_server_host')}:{get('vllm_server_port')}",
                server_timeout=float(get("vllm_server_timeout")),
            ),
            eval_on_policy=bool(get("gold_eval_on_policy")),
            log_completions_steps=int(get("gold_log_completions_steps")),
            teacher_replicate=bool(get("gold_teacher_replicate")),
            teacher_server=TeacherServerSettings(
                url=get("teacher_server_url"),
                timeout=float(get("teacher_server_timeout")),
                retries=int(get("teacher_server_retries")),
                mode=str(get("teacher_server_mode")),
                top_k=int(get("teacher_server_top_k")),
                servers={str(k): str(v) for k, v in (get("teacher_servers") or {}).items()},
                models={str(k): str(v) for k, v in (get("teacher_models") or {}).items()},
                column=str(get("teacher_column")),
            ),
        )


def teacher_dtype(cfg) -> str:
    """``teacher_model_init_kwargs.dtype`` when set, else the student's training precision."""
    kwargs = cfg.get("teacher_model_init_kwargs") or {}
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise GoldConfigError(
                f"`teacher_model_init_kwargs.dtype: {dtype}` is not one of bfloat16, float16, float32."
            )
        return dtype
    if cfg.get("bf16") in (True, "auto"):
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    return "float16" if cfg.get("fp16") else "float32"


# the scoring widths' rounding when the student runs in CUDA graphs and none is set: a graph is
# recorded per distinct micro-batch shape, and the rounding bounds how many (at 1 to 64 padded
# columns a row; the profile measured the rounding's cost at 2% of the student side)
GRAPHED_WIDTH_MULTIPLE = 64


def scoring_width_multiple(cfg) -> int:
    """``gold_scoring_width_multiple`` when set, else 64 under a graphed ``torch_compile_mode``,
    else 1 (no rounding)."""
    value = cfg.get("gold_scoring_width_multiple")
    if value is not None:
        return int(value)
    return GRAPHED_WIDTH_MULTIPLE if graphed_compile(cfg.get("torch_compile"), cfg.get("torch_compile_mode")) else 1


def fuse_projections(cfg, value) -> bool:
    """``gold_rollout_fuse_projections``; unset, as ``gold_rollout_compile`` (the knob for a
    fast decode), except for a sharded student (ZeRO-3, FSDP): each process would hold a whole
    copy of the grouped weights beside its shard (set it true to have them anyway)."""
    if value is not None:
        return bool(value)
    sharded = zero_stage(cfg.get("deepspeed")) == 3 or fsdp_version(cfg) is not None or bool(cfg.get("fsdp_config"))
    return bool(cfg.get("gold_rollout_compile")) and not sharded
