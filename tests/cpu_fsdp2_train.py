"""`python -m axolotl.cli.train CFG` under FSDP2 on a machine without GPUs.

Accelerate turns FSDP on only for accelerator back-ends (``MULTI_GPU``, ``MULTI_XPU``, ...):
on CPU processes (``ACCELERATE_USE_CPU``, gloo) its state stays ``MULTI_CPU`` and the
``fsdp_plugin`` that Axolotl's ``fsdp_config`` built is dropped, so the run would be plain
DDP. FSDP2 itself (``fully_shard``, DTensor, reduce-scatter) runs on gloo in torch 2.13,
so this launcher only completes Accelerate's choice: a ``MULTI_CPU`` state given an FSDP
plugin (or ``ACCELERATE_USE_FSDP``) becomes ``DistributedType.FSDP`` with that plugin, as
on GPUs. Axolotl builds its FSDP device mesh for ``"cuda"`` by name
(``build_parallelism_config``): on a machine without CUDA it is built for ``"cpu"``.
GOLD's INFO lines (how the student and the teacher are held) are printed for the
tests to read. The product code runs unchanged; launched by torchrun with ``ACCELERATE_USE_CPU=true``
(see ``axolotl_run.py``).
"""

import logging
import os
import runpy
import sys

import torch
from accelerate import parallelism_config, state
from accelerate.utils import DistributedType


def _fsdp_on_cpu(init):
    def __init__(self, *args, **kwargs):
        fresh = not state.AcceleratorState._shared_state
        init(self, *args, **kwargs)
        fsdp_plugin = kwargs.get("fsdp_plugin")
        wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None
        if fresh and wanted and self.distributed_type == DistributedType.MULTI_CPU:
            if fsdp_plugin is not None and self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    return __init__


def _cpu_mesh(build):
    def build_device_mesh(self, device_type):
        if device_type == "cuda" and not torch.cuda.is_available():
            device_type = "cpu"
        return build(self, device_type)

    return build_device_mesh


if __name__ == "__main__":
    gold_log = logging.getLogger("axolotl_gold")
    gold_log.setLevel(logging.INFO)
    gold_log.addHandler(logging.StreamHandler())
    gold_log.propagate = False  # once per process, whatever handlers Axolotl adds
    state.AcceleratorState.__init__ = _fsdp_on_cpu(state.AcceleratorState.__init__)
    cls = parallelism_config.ParallelismConfig
    cls.build_device_mesh = _cpu_mesh(cls.build_device_mesh)
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)
