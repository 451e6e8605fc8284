"""Test-only Axolotl plugin: which attention kernels the student's layers may use, and when.

``plugins: [attention_flags_plugin.RecordAttentionFlags]`` (``tests/`` on PYTHONPATH): on the
student's first attention module, every forward (with whether grad is on: a training forward
or gradient checkpointing's recomputation, else evaluation or generation) and every backward
through it append ``torch.backends.cuda.cudnn_sdp_enabled()`` to
``<output_dir>/attention_flags.jsonl``.
"""

import json
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin


class RecordAttentionFlags(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        path = Path(cfg.output_dir) / "attention_flags.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        attention = next(m for name, m in trainer.model.named_modules() if name.endswith("self_attn"))

        def record(kind: str, **extra) -> None:
            with open(path, "a") as f:
                f.write(json.dumps({"kind": kind, "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), **extra}) + "\n")

        def after_forward(module, args, output):
            record("forward", grad=torch.is_grad_enabled())
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda grad: record("backward"))

        attention.register_forward_hook(after_forward)
