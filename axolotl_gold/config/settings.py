"""The resolved GOLD settings the trainer runs with (a plain dataclass, no axolotl)."""

from __future__ import annotations

from dataclasses import dataclass

# Tokens per chunk of the fused JSD. 2048 rather than 1024: on an H100 (0.5B/1.5B Qwen2.5
# heads, 4096 tokens) 11.4 vs 12.0 ms per loss step for 2.0 vs 1.4 GiB extra memory
# (benchmarks/bench_jsd_loss.py); a plain loss takes 24.4 GiB there.
LOSS_CHUNK_SIZE = 2048


@dataclass(frozen=True)
class GoldSettings:
    lmbda: float = 0.5
    beta: float = 0.5
    loss_temperature: float = 1.0
    seq_kd: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 128
    num_generations: int = 1
    generation_batch_size: int = 1
    seed: int = 42
    fused_loss: bool = True
    loss_chunk_size: int = LOSS_CHUNK_SIZE
    use_uld_loss: bool = False
    generation_engine: str = "auto"
    use_vllm: bool = False
    student_path: str = ""
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False
    vllm_sync_steps: int = 1
    vllm_max_model_len: int | None = None
    vllm_dtype: str = "auto"
    vllm_mode: str = "colocate"
    vllm_server_url: str = "http://127.0.0.1:8011"
    vllm_server_timeout: float = 240.0
    eval_on_policy: bool = True
    log_completions_steps: int = 0

    @classmethod
    def from_cfg(cls, cfg) -> "GoldSettings":
        def get(key, default):
            value = cfg.get(key)
            return default if value is None else value

        seed = cfg.get("gold_seed")
        if seed is None:
            seed = get("seed", 42)
        return cls(
            lmbda=float(get("lmbda", 0.5)),
            beta=float(get("beta", 0.5)),
            loss_temperature=float(get("loss_temperature", 1.0)),
            seq_kd=bool(get("seq_kd", False)),
            temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)),
            top_k=int(get("top_k", 0)),
            max_completion_length=int(get("max_completion_length", 128)),
            num_generations=int(get("num_generations", 1)),
            generation_batch_size=int(get("generation_batch_size", 1)),
            seed=int(seed),
            fused_loss=bool(get("gold_fused_loss", True)),
            loss_chunk_size=int(get("gold_loss_chunk_size", LOSS_CHUNK_SIZE)),
            use_uld_loss=bool(get("use_uld_loss", False)),
            generation_engine=str(get("gold_generation_engine", "auto")),
            use_vllm=bool(get("use_vllm", False)),
            vllm_mode=str(get("vllm_mode", "colocate")),
            vllm_server_url=f"http://{get('vllm_server_host', '127.0.0.1')}:{get('vllm_server_port', 8011)}",
            vllm_server_timeout=float(get("vllm_server_timeout", 240.0)),
            student_path=str(get("base_model", "")),
            vllm_gpu_memory_utilization=float(get("vllm_gpu_memory_utilization", 0.3)),
            vllm_tensor_parallel_size=int(get("vllm_tensor_parallel_size", 1)),
            vllm_enable_sleep_mode=bool(get("vllm_enable_sleep_mode", False)),
            vllm_sync_steps=int(get("vllm_sync_steps", 1)),
            vllm_max_model_len=cfg.get("vllm_max_model_len") or cfg.get("sequence_len"),
            # the engine samples in the precision the student trains in
            vllm_dtype="bfloat16" if cfg.get("bf16") is True else "float16" if cfg.get("fp16") else "float32",
            eval_on_policy=bool(get("gold_eval_on_policy", True)),
            log_completions_steps=int(get("gold_log_completions_steps", 0)),
        )
