"""FSDP2 (``fully_shard``) stages of ``axolotl_gold.models.fsdp2`` on 2 CPU processes (gloo).

FSDP2 runs on CPU processes with gloo in torch 2.13 (forward, backward, optimizer step on
DTensor parameters), so everything here is exact, not a smoke test:

- ``benchmarks/fsdp2_check.py`` drives GOLD's stages (student sharded per decoder layer + root,
  teacher sharded by ``shard_teacher`` from rank 0's weights, heads gathered once per
  micro-step, rollouts from the student unsharded once) and compares the weight change of one
  SGD step (lr 1) of a window 2 x (micro 2, accum 2) with one process (8, 1): fused JSD
  (untied and tied heads, off- and on-policy) and hybrid ULD. float32 gives ~4e-5, float64
  ~1e-13 (so the float32 figure is rounding).
- ``tests/fsdp2_workers.py``, run by torchrun (``python -m torch.distributed.run --nproc_per_node 2
  tests/fsdp2_workers.py OUT.json``), checks each stage on its own: the teacher's logits after
  sharding (meta ranks filled from rank 0), replicated teachers, heads gathered and resharded,
  a head that has its own FSDP group (never called: the loss applies it), generation without
  all-gathers, the full state dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
WORKERS = REPO / "tests" / "fsdp2_workers.py"  # the torchrun side of these tests


# ---------------------------------------------------------------- single process
def test_fsdp2_enabled_without_fsdp():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_gold.models.fsdp2 import fsdp2_enabled, fsdp_modules

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    assert not fsdp2_enabled(model) and fsdp_modules(model) == []
    assert not fsdp2_enabled(None)
    assert not fsdp2_enabled(torch.nn.Linear(2, 2))

    class Plugin:
        def __init__(self, version):
            self.fsdp_version = version

    class State:
        def __init__(self, plugin):
            self.fsdp_plugin = plugin

    class Accel:
        def __init__(self, plugin):
            self.state = State(plugin)

    assert fsdp2_enabled(Accel(Plugin(2)))
    assert not fsdp2_enabled(Accel(Plugin(1)))
    assert not fsdp2_enabled(Accel(None))


def test_stage_contexts_are_no_ops_without_fsdp():
    import torch

    from axolotl_gold.models.fsdp2 import gathered_heads, generation_weights

    model = torch.nn.Linear(3, 3)
    with gathered_heads(model, None):
        pass
    with generation_weights(model) as m:
        assert m is model


def test_fsdp_wrapped_head_is_bypassable():
    """``fully_shard`` turns the head into ``FSDPLinear`` (FSDPModule + nn.Linear): the fused
    loss still takes it (hidden states back, the head applied by the loss), while a
    LoRA-style subclass of nn.Linear is still refused. One gloo process, in this process."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from axolotl_gold.models.fsdp2 import gathered_heads
    from axolotl_gold.scoring.forward import bypassable_head, completion_states
    from tests.fsdp2_workers import _llama, _shard_student

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref = _llama(seed=3)
        model = _llama(seed=3)
        mesh = init_device_mesh("cpu", (1,))
        _shard_student(model, mesh, head_group=True)
        assert isinstance(model.lm_head, FSDPModule) and isinstance(model.lm_head, torch.nn.Linear)
        assert type(model.lm_head) is not torch.nn.Linear
        assert bypassable_head(model) is model.lm_head

        ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "completion_labels": torch.zeros(2, 4, dtype=torch.long)}
        with gathered_heads(model), torch.no_grad():
            out = completion_states(model, batch, use_head_bypass=True)
            assert out.head is model.lm_head and out.values.shape == (2, 4, 32)  # hidden, not vocab
            logits = out.values @ out.head.weight.T
            expected = completion_states(ref, batch, use_head_bypass=False).values
        assert torch.allclose(logits, expected, atol=1e-5)

        class LoraLike(torch.nn.Linear):
            pass

        ref.lm_head = LoraLike(32, 96, bias=False)
        assert bypassable_head(ref) is None
    finally:
        if own_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------- 2 processes
def _torchrun(args: list[str], timeout: int = 600, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29800 + os.getpid() % 500), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_window_step_matches_one_process(tmp_path):
    out = tmp_path / "report.json"
    proc = _torchrun([str(REPO / "benchmarks" / "fsdp2_check.py"), "--device", "cpu", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "gloo" and report["world_size"] == 2
    cases = report["cases"]
    assert set(cases) == {"jsd", "jsd_tied", "jsd_onpolicy", "jsd_nosync", "hybrid_uld"}
    for name, case in cases.items():
        assert case["fused_heads"] == [True, True], name  # the loss applied both heads itself
        assert case["relative_l2"] < 1e-4, (name, case)
        assert case["head_relative_l2"] < 1e-4, (name, case)
        # the heads are gathered once per micro-step: as many all-gathers with 2-row
        # chunks as with one chunk
        assert case["gathers_per_micro_step_chunk2"] == case["gathers_per_micro_step_chunk1024"], name
    on = cases["jsd_onpolicy"]
    assert on["same_rollouts"] is True
    assert on["engine_calls"] == 1
    # one all-gather per FSDP group of the student (2 layers + root) for the whole generate
    # call of 10 new tokens, none per decoding step
    assert on["gathers_during_generation"] == 3


@pytest.fixture(scope="module")
def stage_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "stages.json"
    proc = _torchrun([str(WORKERS), str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.e2e
def test_teacher_sharded_from_rank0(stage_report):
    r = stage_report["teacher_sharded"]
    assert r["all_dtensor"] and not r["any_requires_grad"] and not r["training"]
    assert r["meta_left"] == 0
    assert r["logits_max_abs_diff"] < 1e-5  # rank 1 built it on meta: its shards came from rank 0
    assert r["head_resharded_after_forward"]  # no full teacher head left behind by a forward
    assert r["local_fraction"] < 0.6  # each process holds about half of the weights
    # rank 1 loaded zeros (Accelerate's cpu_ram_efficient_loading): rank 0's weights win
    assert r["zeros_on_rank1_logits_max_abs_diff"] < 1e-5


@pytest.mark.e2e
def test_teacher_replicated(stage_report):
    r = stage_report["teacher_replicated"]
    assert not r["any_dtensor"] and not r["any_requires_grad"]
    assert r["logits_max_abs_diff"] < 1e-6


@pytest.mark.e2e
def test_gathered_heads_full_then_resharded(stage_report):
    r = stage_report["gathered_heads"]
    assert r["inside_student_head_full"] and r["inside_teacher_head_full"]
    assert r["after_student_head_dtensor"] and r["after_teacher_head_dtensor"]
    # the teacher's own setting (reshard after forward) is back after the context
    assert r["teacher_reshards_after_forward_again"]


@pytest.mark.e2e
def test_head_in_its_own_group_gets_the_right_gradient(stage_report):
    # lm_head wrapped on its own (as a size-based auto-wrap policy does) and never called:
    # the loss applies its gathered weight; FSDP's final callback reduce-scatters its gradient
    r = stage_report["own_head_group"]
    assert r["head_grad_rel"] < 1e-5, r
    assert r["all_grad_rel"] < 1e-5, r


@pytest.mark.e2e
def test_generation_weights_no_gathers_while_decoding(stage_report):
    r = stage_report["generation"]
    assert r["same_tokens"]
    assert r["entry_gathers"] == r["fsdp_groups"]  # one per group at the entry...
    assert r["gathers_inside_generate"] == 0  # ...and none for the 8 decoding steps
    assert r["resharded_after"]
    assert r["plain_generate_gathers"] > r["fsdp_groups"]  # without the context: per step


@pytest.mark.e2e
def test_static_engine_under_fsdp2_sets_the_hooks_aside(stage_report):
    r = stage_report["static_engine"]
    assert r["same_tokens"], r  # as HF generate on the unsharded model, 5 prompts through 2 slots
    assert r["refills"] == 3
    assert r["hook_calls_inside"] == 0 and r["hooks_left_inside"] == 0
    assert r["gathers_inside"] == 0
    assert r["hook_calls_after"] > 0 and r["hooks_restored_in_order"]
    # HF generate without lockstep: no all-reduce of the stop flags per token, same tokens
    assert r["hf_same_tokens"]
    assert r["hf_all_reduces"]["synced_off"] == 0 and r["hf_all_reduces"]["transformers_default"] >= 8, r


@pytest.mark.e2e
def test_full_state_dict_on_rank0(stage_report):
    r = stage_report["state_dict"]
    assert r["rank0_keys_match"] and r["rank0_max_abs_diff"] == 0.0
    assert r["rank1_empty"]


@pytest.mark.e2e
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs under FSDP2 need a CUDA device")
def test_static_engine_graphs_under_fsdp2_on_cuda(tmp_path):
    """FSDP2 over the GPUs present (NCCL; world size 1 on one GPU): the static engine's
    captured (and compiled) decode step samples from the gathered student with FSDP's
    hooks set aside: the same greedy tokens as HF generate on the unsharded model."""
    import torch

    out = tmp_path / "static_cuda.json"
    gpus = min(2, torch.cuda.device_count())
    proc = _torchrun([str(WORKERS), str(out), "--static-cuda"], nproc=gpus)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    print(json.dumps(report, indent=1))  # the hooks-on capture's outcome is recorded, not required
    for name in ("graph", "compiled"):
        r = report[name]
        assert r["same_tokens"], (name, r)
        assert r["graphs_captured"] >= 1 and r["refills"] > 0, (name, r)
        assert r["hook_calls_inside"] == 0, (name, r)
