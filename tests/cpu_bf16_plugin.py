"""Test-only Axolotl plugin: `bf16: true` on a CPU-only machine.

transformers' TrainingArguments refuses bf16 without a GPU unless ``use_cpu`` is set, and
Axolotl has no key for it; this plugin adds it (``plugins: [cpu_bf16_plugin.UseCpu]``,
``tests/`` on PYTHONPATH). Accelerate then runs the forward in CPU bf16 autocast, as it
runs CUDA's for `bf16: true` on a GPU."""

from axolotl.integrations.base import BasePlugin


class UseCpu(BasePlugin):
    def get_training_args(self, cfg):
        return {"use_cpu": True}
