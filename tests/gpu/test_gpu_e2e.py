"""Every documented configuration runs through `axolotl train` on a GPU (the GPU suite).

Skipped without CUDA; on the GPU machine: ``bash scripts/gpu_suite.sh`` (one command, all
cases concurrently, ~10 minutes at most). ``GOLD_GPU_CASES=lora,vlm`` reruns a subset;
``GOLD_GPU_SUITE_ON_CPU=1`` runs a few cases at tiny sizes on the CPU (the plumbing).

Each case passes when `axolotl train` exits 0, the train and eval losses are finite,
every on-policy window made exactly one generation call, and the saved student (or
adapter) reloads and runs a forward. ``attn-flash`` also passes when flash_attn is absent
and the run stops with an error that names ``flash_attention``.
"""

import pytest
import torch

from gpu_cases import on_cpu, selected

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or on_cpu()),
        reason="GPU suite: needs CUDA (GOLD_GPU_SUITE_ON_CPU=1 runs its plumbing on the CPU)",
    ),
]


@pytest.mark.parametrize("name", [c.name for c in selected()])
def test_case(gpu_suite, name):
    result = gpu_suite[name]
    if result["status"] == "skipped":
        pytest.skip(f"{name}: {result['reason']}")
    assert result["status"] in ("passed", "clear-error"), (
        f"{name}: {result['reason']}\n{result['tail'][-3000:]}"
    )
