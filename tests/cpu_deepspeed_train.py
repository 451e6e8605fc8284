"""`python -m axolotl.cli.train CFG` under DeepSpeed on a machine without GPUs.

Accelerate chooses a distributed backend only for accelerators (NCCL) or for its
``cpu`` mode, which turns DeepSpeed off; without one, a DeepSpeed run sees a
single process. DeepSpeed itself runs on the CPU over gloo, so every process state
made here defaults to ``backend="gloo"``: a real multi-process DeepSpeed run (ZeRO-3
partitioning, module hooks, gradient reduce-scatter) on this machine. The product
code runs unchanged; this only stands in for NCCL. Launched by torchrun with
``ACCELERATE_USE_DEEPSPEED=true`` (see ``axolotl_run.py``).
"""

import runpy
import sys

from accelerate import state


def _gloo_by_default(init):
    def __init__(self, cpu: bool = False, **kwargs):
        if kwargs.get("backend") is None:
            kwargs["backend"] = "gloo"
        init(self, cpu, **kwargs)

    return __init__


if __name__ == "__main__":
    state.PartialState.__init__ = _gloo_by_default(state.PartialState.__init__)
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)
