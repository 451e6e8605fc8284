"""The benchmark scripts that drive `axolotl train` still run end to end (tiny shapes, CPU), so
the figures in the README can be reproduced with the code as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_real_sizes_runs_a_quantized_teacher_beside_a_lora_student(tmp_path):
    out = tmp_path / "real_sizes.json"
    stdout = _run(["benchmarks/real_sizes.py", "--tiny", "--device", "cpu", "--prompt", "16", "--completion", "24",
                   "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work"), "--json", str(out)],
                  tmp_path)
    result = json.loads(out.read_text())
    assert result["measured"]["tokens_per_s"] > 0
    assert result["measured"]["tokens_per_step"] == 4 * 24  # 1 x 4 rollouts forced to full length
    assert set(result["model"]["parts"]) >= {"teacher (nf4)", "KV cache", "loss chunk"}
    assert "| tokens/s |" in stdout
    config = (tmp_path / "work" / "cfg.yaml").read_text()
    assert "load_in_4bit: true" in config and "adapter: lora" in config


def test_bench_cli_runs_the_plain_loop_and_axolotl_train(tmp_path):
    out = tmp_path / "bench_cli.json"
    _run(["benchmarks/bench_cli.py", "--tiny", "--device", "cpu", "--compile", "--steps", "2", "--fuse-projections", "off",
          "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work"), "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    for name in ("plain loop", "axolotl train"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["tokens_per_s"] > 0
    config = (tmp_path / "work" / "cfg.yaml").read_text()
    assert "gold_rollout_compile: true" in config and "gold_rollout_fuse_projections: false" in config


def test_bench_cli_trains_a_lora_student_through_axolotl_train(tmp_path):
    """--lora-r: `axolotl train` with a LoRA student (Axolotl's CUDA-only LoRA kernels off on the
    CPU); the plain loop trains the whole student, so the flag refuses to run beside it."""
    out = tmp_path / "bench_cli.json"
    common = ["benchmarks/bench_cli.py", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--lora-r", "4",
              "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work")]
    _run([*common, "--skip-plain", "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert list(rows) == ["axolotl train"]
    assert "error" not in rows["axolotl train"], rows["axolotl train"]
    assert rows["axolotl train"]["tokens_per_s"] > 0
    config = (tmp_path / "work" / "cfg.yaml").read_text()
    assert "adapter: lora" in config and "lora_r: 4" in config and "lora_qkv_kernel: false" in config
    log = Path(rows["axolotl train"]["log"]).read_text()
    assert "trainable params" in log.lower() or "trainable%" in log.lower(), log[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    refused = subprocess.run([sys.executable, *common], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--skip-plain" in refused.stderr


def test_bench_fused_lora_compares_the_grouped_lora_decode_with_peft(tmp_path):
    """bench_fused_lora: the same greedy completions with and without the groups, and fewer GEMM
    calls a token step with them (each LoRA layer's three become three a group)."""
    out = tmp_path / "fused_lora.json"
    stdout = _run(["benchmarks/bench_fused_lora.py", "--tiny", "--device", "cpu", "--rounds", "1", "--json", str(out)],
                  tmp_path)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["equal_completions"] == "4 of 4"
    # 2 layers: peft's 7 x 3 GEMMs a layer against 3 + 3 (the groups) + 3 + 3 (o, down), the head once
    assert rows["unfused"]["gemms_per_token_step"] - rows["fused"]["gemms_per_token_step"] == pytest.approx(2 * 9, abs=1)
    assert rows["fused"]["s_per_call"] > 0 and "| fused |" in stdout


def _table_rows(stdout: str, first_cell: str) -> list[list[str]]:
    """The markdown rows of ``stdout`` whose first cell starts with ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0].startswith(first_cell)]


def test_bench_cli_profiles_a_step_after_the_measured_ones(tmp_path):
    """--profile-step: one step more runs under torch.profiler inside `axolotl train`; the host's
    reads of device values are found with the line that asked (on the CPU: the trainer's read
    of the gradient norm; HF's per-micro-step loss read is gone, the trainer turned it off)."""
    out = tmp_path / "bench_cli.json"
    stdout = _run(["benchmarks/bench_cli.py", "--tiny", "--device", "cpu", "--steps", "1", "--skip-plain",
                   "--profile-step", "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work"),
                   "--json", str(out)], tmp_path)
    row = json.loads(out.read_text())["axolotl train"]
    assert "error" not in row and row["tokens_per_s"] > 0, row
    profiled = row["step_profile"]
    assert profiled.startswith("optimizer step 3 of `axolotl train`")  # warm-up 2 + 1 measured: the 4th
    waits = [r for r in _table_rows(profiled, "aten::_local_scalar_dense")]
    assert any("axolotl_gold/trainer/nonfinite.py" in r[3] for r in waits), profiled
    assert not any("transformers/trainer.py" in r[3] for r in waits), profiled
    assert "host waits for the device" in stdout


def test_step_profile_finds_the_idle_between_kernels():
    """busy_and_gaps against a millisecond-by-millisecond count on random intervals."""
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_profile import busy_and_gaps

    rng = random.Random(0)
    for _ in range(200):
        spans = []
        for _ in range(rng.randint(1, 8)):
            a = rng.randint(0, 60)
            spans.append((a, a + rng.randint(0, 15)))
        span, busy, gaps = busy_and_gaps([(float(a), float(b)) for a, b in spans])
        first, last = min(a for a, _ in spans), max(b for _, b in spans)
        covered = {t for a, b in spans for t in range(a, b)}
        assert span == last - first
        assert busy == len(covered), spans
        idle = [t for t in range(first, last) if t not in covered]
        assert sum(b - a for a, b in gaps) == len(idle), spans
        assert all(g[1] - g[0] >= h[1] - h[0] for g, h in zip(gaps, gaps[1:]))  # longest first
    assert busy_and_gaps([]) == (0.0, 0.0, [])


def test_step_profile_names_who_asked_for_a_runtime_call_and_what_ended_a_gap():
    """CUDA runtime calls (a synchronize, a launch) come with no parent: the op around them on
    their thread stands in, so the wait is named by the Python line of the copy that made it;
    each idle gap also names the launch that ended it. Synthetic events in the profiler's shape
    (a CPU profile has no runtime calls)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_profile import _frame, report

    class Range(SimpleNamespace):
        def elapsed_us(self):
            return self.end - self.start

    def event(name, a, b, device=DeviceType.CPU, thread=1, stack=(), parent=None):
        return SimpleNamespace(name=name, time_range=Range(start=a, end=b), device_type=device,
                               thread=thread, stack=list(stack), cpu_parent=parent, is_user_annotation=False)

    copy = event("aten::copy_", 100, 400, stack=["torch/nn/modules/module.py(1): to",
                                                  "transformers/trainer.py(4000): _prepare_input"])
    sync = event("cudaStreamSynchronize", 130, 390)
    other_thread = event("aten::mm", 0, 1000, thread=2, stack=["mine.py(7): step"])
    launch = event("cudaLaunchKernel", 500, 505)
    forward = event("aten::linear", 480, 520, stack=["axolotl_gold/scoring/forward.py(90): run"])
    inner_only = event("cudaDeviceSynchronize", 600, 610)
    graphs = event("aten::add", 590, 620, stack=["torch/_inductor/cudagraph_trees.py(1221): run"])
    kernels = [event("k1", 0, 140, device=DeviceType.CUDA), event("k2", 510, 700, device=DeviceType.CUDA)]
    host = [copy, sync, other_thread, launch, forward, inner_only, graphs]
    assert _frame(sync, host) == "transformers/trainer.py(4000): _prepare_input"
    assert _frame(inner_only, host) == "torch: torch/_inductor/cudagraph_trees.py(1221): run"
    assert _frame(sync) == "(no Python frame outside torch)"  # without the ops around it
    text = report(host + kernels)
    gap = _table_rows(text, "0.37")  # 140 -> 510 us
    assert gap and gap[0][1:3] == ["cudaStreamSynchronize", "transformers/trainer.py(4000): _prepare_input"], text
    assert gap[0][3] == "cudaLaunchKernel: axolotl_gold/scoring/forward.py(90): run", text
    waits = _table_rows(text, "cudaStreamSynchronize")
    assert waits[0][3] == "transformers/trainer.py(4000): _prepare_input", text


def test_ragged_lengths_from_a_stop_set_in_the_plain_loop_and_the_reference(tmp_path):
    """--ragged: a mean length near 40% of the limit (12 tokens: intended 4.8), not forced;
    the forced run of the same engine beside it, and the cost per generated token."""
    stdout = _run(["benchmarks/bench_vs_reference.py", "--tiny", "--device", "cpu", "--ragged", "--steps", "6",
                   "--variants", "ours-hf,reference", "--json-dir", str(tmp_path)], tmp_path)
    forced = json.loads((tmp_path / "ours-hf-forced.json").read_text())
    assert forced["windows"] and all(n == 12 for w in forced["windows"] for n in w)
    for name in ("ours-hf", "reference"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        lengths = [n for w in result["windows"] for n in w]
        assert len(lengths) == 6 * 4 and max(lengths) <= 12
        assert 2.0 < sum(lengths) / len(lengths) < 8.5, lengths  # geometric, q = 0.19: mean 4.8
        row = _table_rows(stdout, name)[-1]
        assert 0 < float(row[1]) < 12  # mean len column of the ragged table
    row = _table_rows(stdout, "ours-hf")[-1]
    assert abs(float(row[5]) - 0.1923) < 0.06  # the student's measured stop mass vs intended q
    assert float(row[9].rstrip("x")) > 0  # ms per generated token against the forced run


def test_ragged_helpers_size_the_stop_set_for_the_mean():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ragged

    q = ragged.stop_rate(768)
    assert abs(ragged.expected_length(q, 768) - 0.4 * 768) < 1e-6
    ids = ragged.stop_ids(151936, 768, [151935, 151933])
    assert len(ids) == round(q * 151936) and {151935, 151933} <= set(ids) and 151934 not in ids
    # StaticCacheEngine's schedule (decode steps, row-steps): checks every 32 steps and at a
    # row's last token (767: token 0 came from the prefill), compaction once half stopped
    assert ragged.engine_schedule([768] + [10] * 15, 768, "static") == (767, 16 * 32 + 735)
    assert ragged.engine_schedule([768] + [10] * 15, 768, "static-compiled") == (767, 16 * 32 + 4 * 735)
    assert ragged.engine_schedule([5, 9], 768, "hf") == (8, 16)
    # 3 prompts in 2 slots, checks every step: the third starts in slot 0 at step 2 (its
    # row stopped at token 2), slot 0 stops again at step 3, so slot 1 goes on alone
    assert ragged.engine_schedule([3, 5, 2], 8, "static", slots=2, every=1) == (4, 2 + 2 + 2 + 1)
    # every 4 steps: both rows stopped by step 4, the third prompt runs steps 4 to 7
    assert ragged.engine_schedule([3, 5, 2], 8, "static", slots=2, every=4) == (8, 16)
    # one batch after another: [3, 5] for 4 steps, then [2] until its check at 4
    assert ragged.engine_schedule([3, 5, 2], 8, "static-chunked", slots=2, every=4) == (8, 12)


def test_peak_allocations_replays_the_allocator_trace():
    """bench_cli --memory-at-peak: the peak of a trace, what is alive at it, by site; a
    free of something allocated before the recording lowers what is still held."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peak_allocations

    def frame(path, line, name):
        return {"filename": path, "line": line, "name": name}

    torch_frame = frame("/x/site-packages/torch/nn/functional.py", 10, "linear")
    model = [torch_frame, frame("/x/transformers/models/qwen2/modeling_qwen2.py", 72, "forward")]
    loss = [frame("/w/axolotl_gold/losses/chunked.py", 270, "forward")]
    adam = [frame("/x/site-packages/torch/optim/adamw.py", 5, "step")]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": model},
        {"action": "alloc", "addr": 2, "size": 50, "frames": model},
        {"action": "free_requested", "addr": 99, "size": 30, "frames": []},  # held before the recording
        {"action": "free_completed", "addr": 99, "size": 30, "frames": []},
        {"action": "alloc", "addr": 3, "size": 400, "frames": loss},
        {"action": "alloc", "addr": 4, "size": 7, "frames": []},  # made by autograd's engine
        {"action": "free_requested", "addr": 3, "size": 400, "frames": loss},
        {"action": "free_requested", "addr": 2, "size": 50, "frames": model},
        {"action": "alloc", "addr": 5, "size": 450, "frames": adam},  # 1000 + 100 + 7 + 450 - 30 < the peak
    ]
    result = peak_allocations.live_at_peak(trace, 1000)
    assert result["peak"] == 1000 - 30 + 100 + 50 + 400 + 7
    assert result["held_at_peak"] == 970
    assert result["sites"] == [["chunked.py:270 forward", 400], ["modeling_qwen2.py:72 forward", 150],
                               ["autograd backward (no Python frame)", 7]]
    assert peak_allocations.site_of(adam) == "adamw.py:5 step"
    assert peak_allocations.site_of([torch_frame]) == "functional.py (torch)"
    held = {"allocated": 2**30, "student weights": 2**29, "student grads": 0, "optimizer state": 2**28,
            "teacher weights": 2**27}
    table = peak_allocations.peak_table(dict(result, held_at_start=held))
    assert "| other, held at the step's start | 0.12 |" in table and "| chunked.py:270 forward | 0.000 |" in table


def test_bench_refill_counts_what_the_replay_predicts_and_refilling_saves_steps(tmp_path):
    out = tmp_path / "bench_refill.json"
    stdout = _run(["benchmarks/bench_refill.py", "--tiny", "--device", "cpu", "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    for row in rows.values():
        assert row["token_steps"] == row["replayed_steps"] and row["row_steps"] == row["replayed_row_steps"]
        assert 0.2 < row["lengths"]["mean"] / 48 < 0.6  # ragged: 40% of the limit intended
    assert rows["refill"]["refills"] > 0 and rows["chunked"]["refills"] == 0
    assert rows["one batch"]["token_steps"] < rows["refill"]["token_steps"] < rows["chunked"]["token_steps"]
    assert len(_table_rows(stdout, "refill")) == 1


def test_bench_fsdp2_rollout_samples_the_same_with_the_hooks_set_aside(tmp_path):
    out = tmp_path / "bench_fsdp2_rollout.json"
    stdout = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29600 + os.getpid() % 300), "benchmarks/bench_fsdp2_rollout.py", "--tiny",
                   "--rounds", "1", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["processes"] == 2 and set(rows) == {
        "hf, hooks on", "static, hooks on", "hf, set aside", "hf, set aside, no lockstep", "static, set aside"}
    assert all(r["ms_per_call"] > 0 for r in rows.values())
    for name in ("hf, set aside", "hf, set aside, no lockstep", "static, set aside"):
        assert rows[name]["same_rollouts_as_hooks_on"] is True, name
    assert len(_table_rows(stdout, "static, set aside")) == 1


def test_bench_cli_ragged_runs_the_forced_loop_beside_it(tmp_path):
    out = tmp_path / "bench_cli.json"
    stdout = _run(["benchmarks/bench_cli.py", "--tiny", "--device", "cpu", "--ragged", "--steps", "3",
                   "--cache-dir", str(tmp_path / "models"), "--workdir", str(tmp_path / "work"), "--json", str(out)],
                  tmp_path)
    rows = json.loads(out.read_text())
    for name in ("plain loop", "plain loop (forced)", "axolotl train"):
        assert "error" not in rows[name], rows[name]
    assert all(n == 12 for w in rows["plain loop (forced)"]["windows"] for n in w)
    for name in ("plain loop", "axolotl train"):
        lengths = [n for w in rows[name]["windows"] for n in w]
        assert len(lengths) == 3 * 4 and 0 < sum(lengths) / len(lengths) < 12
        assert float(_table_rows(stdout, name)[-1][9].rstrip("x")) > 0
    config = (tmp_path / "work" / "cfg.yaml").read_text()
    assert "rollout_plugins.RolloutLengths" in config and "FixedLengthRollouts" not in config
    assert len(json.loads((tmp_path / "models" / "tiny-v512-s0-cpu-stops98" / "student" / "generation_config.json")
                          .read_text())["eos_token_id"]) == 98


def test_profile_student_step_times_every_stage(tmp_path):
    out = tmp_path / "profile.json"
    stdout = _run(["benchmarks/profile_student_step.py", "--tiny", "--device", "cpu", "--steps", "2", "--variants",
                   "--torch-profile", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    stages = ("prefill", "student forward", "teacher forward", "loss", "loss backward", "model backward",
              "optimizer step", "zero_grad")
    for stage in stages:
        row = _table_rows(stdout, stage)[0]
        assert float(row[1]) > 0 and result["stages_ms"][stage] > 0, row
    assert result["floors_ms"]["student forward"] > 0 and result["floors_ms"]["optimizer step"] > 0
    assert _table_rows(stdout, "student side, as the plain loop runs it")
    # as the trainer queues it (no sync between stages), the teacher's states made beforehand
    unsynced = "student side, no waits between stages"
    assert _table_rows(stdout, unsynced) and result["stages_ms"][unsynced] > 0
    variants = result["variants"]
    assert {"gradient checkpointing on", "loss chunk 1024", "loss chunk 2048", "Liger fused linear JSD"} <= set(variants)
    assert "loss chunk 512" not in variants  # the default: the baseline
    drawn = [v for k, v in variants.items() if k.startswith("rows as drawn, not grouped by length")]
    assert drawn and drawn[0]["model backward"] > 0  # forced lengths here: as many positions either way
    liger = [v for k, v in variants.items() if k.startswith("student with Liger")]
    assert liger and liger[0].startswith("skipped"), liger  # CUDA only
    assert all(v["model backward"] > 0 and v[unsynced] > 0 for k, v in variants.items() if isinstance(v, dict))
    # the student through torch.compile (as `torch_compile: true` leaves it): compiled once,
    # its graphs reused by the row with loss chunk 4096
    compiled, chunked = variants["student torch.compile"], variants["student torch.compile + loss chunk 4096"]
    assert isinstance(compiled, dict) and isinstance(chunked, dict), (compiled, chunked)
    assert compiled["dynamo graphs"] >= 1 and compiled["first step"] > 0
    assert chunked["dynamo graphs"] == 0 and chunked["model backward"] > 0
    graphed = variants["student torch.compile, mode reduce-overhead (CUDA graphs)"]  # its own wrapper
    assert isinstance(graphed, dict) and graphed["dynamo graphs"] >= 1, graphed
    # the masked layout (rows not rolled left), eager and graphed: the compiled forward differs
    masked = variants["padding mask: rows not rolled left (scoring.causal_rows undone)"]
    assert isinstance(masked, dict) and masked["model backward"] > 0, masked
    graphed_masked = variants["student torch.compile, mode reduce-overhead, padding mask (rows not rolled)"]
    assert isinstance(graphed_masked, dict) and graphed_masked["dynamo graphs"] >= 1, graphed_masked
    # as `axolotl train` runs a bf16 full fine-tune (float32 embeddings / head / norms, autocast):
    # eager, and two graphed rows with their own wrapper each (the second casts the embedding's output)
    axolotl = [v for k, v in variants.items() if k.startswith("Axolotl's full fine-tune dtypes")]
    assert len(axolotl) == 3 and all(isinstance(v, dict) and v["model backward"] > 0 for v in axolotl), axolotl
    assert axolotl[1]["dynamo graphs"] >= 1 and axolotl[2]["dynamo graphs"] >= 1, axolotl
    tuned = variants["student torch.compile, mode max-autotune (GEMMs autotuned, CUDA graphs)"]
    assert tuned.startswith("skipped: CUDA only"), tuned
    assert "top 25" in stdout and "aten::mm" in stdout  # CPU: ops by self time
    # each student-side stage's own ops: the matmuls of the backward are the backward's
    assert _table_rows(stdout, "**model backward**") and _table_rows(stdout, "**loss**")
    assert any(r[1] == "aten::mm" for r in _table_rows(stdout, "model backward")), stdout


def test_bench_multi_gpu_runs_its_one_gpu_rows_and_writes_each_strategy(tmp_path):
    """On the CPU only the 1-GPU rows run (together, as on the 2-GPU machine); each row's
    YAML carries its strategy's keys."""
    out = tmp_path / "multi.json"
    stdout = _run(["benchmarks/bench_multi_gpu.py", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                   "--rows", "1 GPU,1 GPU hf engine", "--cache-dir", str(tmp_path / "models"),
                   "--workdir", str(tmp_path / "work"), "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert set(rows) == {"1 GPU", "1 GPU hf engine"}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows.values()), rows
    assert "gold_generation_engine: hf" in (tmp_path / "work" / "1_GPU_hf_engine" / "cfg.yaml").read_text()
    assert "gold_generation_engine" not in (tmp_path / "work" / "1_GPU" / "cfg.yaml").read_text()
    assert [r[3] for r in _table_rows(stdout, "1 GPU")] == ["1.00x", "1.00x"]  # each its own baseline
    with pytest.raises(AssertionError, match="unknown"):
        _run(["benchmarks/bench_multi_gpu.py", "--rows", "8 GPUs"], tmp_path)


def test_bench_attention_layout_times_each_layout_and_names_its_kernels(tmp_path):
    """CPU smoke test: every shape x layout timed, the kernels each ran listed."""
    out = tmp_path / "layout.json"
    stdout = _run(["benchmarks/bench_attention_layout.py", "--device", "cpu", "--width", "32", "--iters", "1",
                   "--warmup", "1", "--json", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert len(result) == 6 and all(r["forward_backward_ms"] > 0 and r["kernels"] for r in result.values())
    masked = _table_rows(stdout, "student 0.5B")[0]
    assert masked[1] == "padding mask (KV repeated)" and masked[4] == "1.00x"
    # the masked variant's mask: left padding, then causal over the real tokens
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_attention_layout as layout

    mask = layout.left_padded_mask(2, 8, "cpu")
    assert mask.shape == (2, 1, 8, 8) and mask[0, 0].sum() == sum(range(1, 5))  # 4 real tokens, causal


def test_profile_decode_axolotl_dtypes_upcasts_what_axolotls_loader_does():
    """--axolotl-dtypes: embeddings (the tied head with them) and every ``*norm*`` float32, as
    ``ModelLoader._convert_embedding_modules_dtype`` leaves a bf16 full fine-tune with sdpa; the
    layers' projections stay bf16."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_decode

    args = profile_decode.parse_args(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                                      "--intermediate", "128", "--vocab", "300", "--axolotl-dtypes"])
    assert args.axolotl_dtypes
    model = profile_decode.build(args, "cpu").to(torch.bfloat16)
    profile_decode.axolotl_dtypes(model)
    upcast = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert upcast == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_profile_decode_times_the_engines_own_token_step_after_the_forward():
    """``emit_step`` drives ``StaticCacheEngine._emit`` with the engine's own ``RowState`` (a
    changed signature of either broke the GPU run after its compiles): each call records one
    token per row at the row's step, never the EOS ``min_new_tokens`` suppresses, and the
    variants the arguments ask for carry their compile mode."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_decode
    from axolotl_gold.rollouts.engines.base import SamplingSettings
    from axolotl_gold.rollouts.engines.noise import row_seeds

    args = profile_decode.parse_args(["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
                                      "--intermediate", "64", "--vocab", "50", "--batch", "3", "--new", "4"])
    model = profile_decode.build(args, "cpu")
    sampling = SamplingSettings(max_new_tokens=args.new, temperature=args.temperature, top_p=args.top_p)
    logits = torch.zeros(args.batch, args.vocab)
    logits[:, args.vocab - 1] = 30.0  # the EOS would win every draw were it not suppressed
    emit, state = profile_decode.emit_step(args, model, sampling, args.vocab - 3, args.vocab - 1,
                                           row_seeds(0, torch.arange(args.batch)), logits)
    emit()
    first = state.generated[:, 0]
    assert ((first >= 0) & (first < args.vocab - 1)).all() and not state.finished.any()
    assert (state.generated[:, 1:] == args.vocab - 3).all()

    modes = profile_decode.parse_args(["--only-compile", "--attention", "kernel", "--fuse-projections", "both",
                                       "--compile-modes", "default,max-autotune-no-cudagraphs"])
    variants = profile_decode.decode_variants(modes)
    assert variants == [(True, True, True, None, False), (True, True, True, None, True),
                        (True, True, True, "max-autotune-no-cudagraphs", False),
                        (True, True, True, "max-autotune-no-cudagraphs", True)]
    labels = [profile_decode.variant_label(*v) for v in variants]
    assert len(set(labels)) == 4 and "max-autotune-no-cudagraphs" in labels[3] and "fused" in labels[3]


def test_profile_decode_lists_whole_kernel_names_per_step():
    """The kernel list keeps inductor's long fused names whole and divides by the steps."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_decode

    name = "triton_poi_fused__to_copy_add_cat_cos_expand_minimum_mul_neg_sin_slice_unsqueeze_0"
    events = [SimpleNamespace(key=name, count=480, self_device_time_total=1940.0),
              SimpleNamespace(key="gemm", count=240, self_device_time_total=2400.0),
              SimpleNamespace(key="cpu only", count=5, self_device_time_total=0.0)]
    text = profile_decode.kernel_lines(events, steps=10)
    lines = text.splitlines()
    assert lines[2] == "| 24.0 | 10.00 | 0.240 | `gemm` |"
    assert lines[3] == f"| 48.0 | 4.04 | 0.194 | `{name}` |"
    assert "cpu only" not in text
