"""The GPU suite's cases: YAML overrides on one base GOLD config, one per documented setting.

Every case is a short on-policy run (``lmbda: 1``: every window samples once) that
evaluates and saves, so a configuration that only breaks in evaluation or saving shows.
Names are ``<what>-<variant>``; ``GOLD_GPU_CASES=lora,vlm`` selects by substring.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field

MAX_STEPS = 2
LORA = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True}
# Axolotl turns its LoRA kernels on by default; they are CUDA-only (set off in the CPU run)
LORA_KERNELS_OFF = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
PRECISION = {
    "bf16": {"bf16": True, "fp16": False},
    "fp16": {"bf16": False, "fp16": True},
    "fp32": {"bf16": False, "fp16": False, "tf32": True},
}
LIGER = {
    "plugins": ["axolotl.integrations.liger.LigerPlugin", "axolotl_gold.GoldPlugin"],
    "liger_rms_norm": True, "liger_glu_activation": True, "liger_rope": True,
}
# with the dataset type `axolotl_gold.vision.chat_template` (base_config, from the model group)
VLM = {"processor_type": "AutoProcessor", "skip_prepare_dataset": True, "remove_unused_columns": False}
VLM_LORA_TARGET = r"model.language_model.layers.[\d]+.(self_attn|mlp).(q|k|v|o|gate|up|down)_proj"
CPU_DEFAULT = ("full-fp32-hf", "lora-fp32-hf")


@dataclass
class Case:
    name: str
    overrides: dict = field(default_factory=dict)
    models: str = "llama"  # an Assets group
    needs: str | None = None  # a module that must import, else the case is skipped
    flash: bool = False  # passes with a clear error naming the key if flash_attn is absent
    check_gc_kwargs: dict | None = None  # expected gradient_checkpointing_kwargs in the saved args

    @property
    def adapter(self) -> str | None:
        return self.overrides.get("adapter")


def base_config(pair: dict, workdir: str) -> dict:
    return {
        "base_model": pair["student"],
        "plugins": ["axolotl_gold.GoldPlugin"],
        "teacher_model": pair["teacher"],
        "lmbda": 1.0,
        "beta": 1.0,
        "temperature": 1.0,
        "max_completion_length": 32,
        "num_generations": 2,
        "datasets": [{"path": pair["train"], "ds_type": "json",
                      "type": "axolotl_gold.vision.chat_template" if pair.get("kind") == "vlm" else "chat_template"}],
        "val_set_size": 0.125,
        "sequence_len": 256,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": MAX_STEPS,
        "learning_rate": 1e-4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "bf16": True,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": True,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": MAX_STEPS,
        "save_steps": MAX_STEPS,
        "save_safetensors": True,
        "output_dir": f"{workdir}/out",
        "dataset_prepared_path": f"{workdir}/prepared",
        "seed": 7,
        "dataset_num_proc": 1,
        "dataloader_num_workers": 0,
    }


def all_cases() -> list[Case]:
    cases = []
    for mode, extra, needs in (("full", {}, None), ("lora", LORA, None),
                               ("qlora", {**LORA, "adapter": "qlora", "load_in_4bit": True}, "bitsandbytes")):
        for precision, keys in PRECISION.items():
            for engine in ("static", "hf"):
                beta = 1.0 if engine == "static" else 0.5  # reverse KL / JSD
                cases.append(Case(f"{mode}-{precision}-{engine}", needs=needs, overrides={
                    **extra, **keys, "gold_generation_engine": engine, "beta": beta}))
    cases += [
        Case("gc-off", {"gradient_checkpointing": False}),
        # Axolotl's default is {use_reentrant: true}: the non-reentrant case is the one that
        # shows whether the kwargs are kept rather than defaulted
        Case("gc-reentrant", {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
             check_gc_kwargs={"use_reentrant": True}),
        Case("gc-nonreentrant", {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
             check_gc_kwargs={"use_reentrant": False}),
        Case("liger-full", LIGER, needs="liger_kernel"),
        Case("liger-full-flce", {**LIGER, "liger_fused_linear_cross_entropy": True}, needs="liger_kernel"),
        Case("liger-lora", {**LIGER, **LORA}, needs="liger_kernel"),
        Case("attn-sdpa", {"sdp_attention": True}),
        Case("attn-eager", {"attn_implementation": "eager"}),
        Case("attn-flash", {"flash_attention": True}, flash=True),
        Case("compile-full", {"gold_rollout_compile": True}),
        Case("compile-lora", {**LORA, "gold_rollout_compile": True}),
        # the decode step's q/k/v and gate/up as one GEMM each (rollouts/engines/fused_projections.py),
        # compiled and captured, beside Accelerate's compiled student
        Case("fused-compile-full", {"gold_rollout_compile": True, "gold_rollout_fuse_projections": True,
                                    "torch_compile": True}),
        # Axolotl's torch_compile: Accelerate compiles the student for the training forward and
        # backward (the engines keep the plain model); with the compiled decode step beside it
        Case("torch-compile-full", {"torch_compile": True}),
        Case("torch-compile-lora-rollout", {**LORA, "torch_compile": True, "gold_rollout_compile": True}),
        # inductor's CUDA graphs of the student's forward and backward (trainer.grad_buffers;
        # widths rounded to 64, half of them where cuDNN's attention backward gave NaN)
        Case("torch-compile-graphs-full", {"torch_compile": True, "torch_compile_mode": "reduce-overhead",
                                           "gradient_checkpointing": False}),
        Case("torch-compile-graphs-lora", {**LORA, "torch_compile": True, "torch_compile_mode": "reduce-overhead",
                                           "gold_rollout_compile": True, "gradient_checkpointing": False}),
        # widths rounded to 64: half of them 64 more than a multiple of 128, where cuDNN's
        # attention backward gives NaN unless the trainer turns it off (trainer.attention_backends)
        Case("width-multiple-64", {"gold_scoring_width_multiple": 64}),
        Case("sliding-static", {"gold_generation_engine": "static"}, models="sliding"),
        Case("sliding-auto", {"gold_generation_engine": "auto"}, models="sliding"),
        Case("cross-uld-hybrid", {"use_uld_loss": True, "uld_use_hybrid_loss": True, "beta": 0.5}, models="cross"),
        Case("vlm-same-full", {**VLM, "beta": 0.5}, models="vlm-same"),
        # Axolotl's LoRA kernels do not know LLaVA's attention and say to turn them off (as
        # example_yamls/gold_vlm_cross_family.yaml does)
        Case("vlm-same-lora", {**VLM, **LORA, **LORA_KERNELS_OFF, "lora_target_linear": None,
                               "lora_target_modules": VLM_LORA_TARGET}, models="vlm-same"),
        Case("vlm-cross-full", {**VLM, "use_uld_loss": True, "uld_use_hybrid_loss": True, "beta": 0.5},
             models="vlm-cross"),
        Case("vlm-cross-lora", {**VLM, **LORA, **LORA_KERNELS_OFF, "lora_target_linear": None,
                                "lora_target_modules": VLM_LORA_TARGET,
                                "use_uld_loss": True, "uld_use_hybrid_loss": True}, models="vlm-cross"),
        # the static engine on prompts with images (auto picks HF generate for them until these pass)
        Case("vlm-same-static", {**VLM, "beta": 0.5, "gold_generation_engine": "static"}, models="vlm-same"),
        Case("vlm-same-static-compile", {**VLM, "beta": 0.5, "gold_generation_engine": "static",
                                         "gold_rollout_compile": True}, models="vlm-same"),
    ]
    return cases


def on_cpu() -> bool:
    return os.environ.get("GOLD_GPU_SUITE_ON_CPU") == "1"


def selected() -> list[Case]:
    """Cases named by GOLD_GPU_CASES (comma-separated substrings); all (CPU run: a few) if unset."""
    wanted = [w.strip() for w in os.environ.get("GOLD_GPU_CASES", "").split(",") if w.strip()]
    cases = all_cases()
    if wanted:
        return [c for c in cases if any(w in c.name for w in wanted)]
    return [c for c in cases if c.name in CPU_DEFAULT] if on_cpu() else cases


def for_this_machine(case: Case, cfg: dict) -> dict:
    """The CPU run: float32 without TF32, LoRA without Axolotl's CUDA-only kernels."""
    if on_cpu():
        cfg.update(bf16=False, fp16=False, tf32=False)
        if case.adapter:
            cfg.update(LORA_KERNELS_OFF)
    return cfg


@functools.cache
def missing_module(name: str | None) -> str | None:
    """Why ``name`` cannot be imported here (in a fresh interpreter), or None."""
    if name is None:
        return None
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return f"`import {name}` fails here: {last[:200]}"
