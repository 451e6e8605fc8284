"""bench_cli.py --memory-at-peak: what a step of `axolotl train` holds at its CUDA memory peak.

``PeakAllocations`` is an Axolotl plugin (``plugins: [peak_allocations.PeakAllocations]``,
``benchmarks/`` on PYTHONPATH): during step GOLD_BENCH_PEAK_STEP it records CUDA's allocator
(``torch.cuda.memory._record_memory_history``), and at the step's end it writes to
GOLD_BENCH_PEAK_OUT what was held when the step began (student weights, gradients, optimizer
state, teacher) and the allocations alive at the step's peak, grouped by the Python line that
made them (``live_at_peak``); ``peak_table`` prints it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:  # loaded by `axolotl train` as a plugin; bench_cli's own process only prints the table
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - a machine without axolotl
    BasePlugin = object


class PeakAllocations(BasePlugin):
    """Benchmark only (--memory-at-peak): during step GOLD_BENCH_PEAK_STEP (0-based), CUDA's
    allocator history is recorded; at the step's end the allocations alive at its peak are
    grouped by where they were made (``peak_table``) and written to GOLD_BENCH_PEAK_OUT."""

    def post_trainer_create(self, cfg, trainer):
        import torch
        from transformers import TrainerCallback

        path, step = os.environ.get("GOLD_BENCH_PEAK_OUT"), int(os.environ.get("GOLD_BENCH_PEAK_STEP", "1"))
        if not path or not torch.cuda.is_available():
            return

        class Record(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step:
                    self.held = held_parts(trainer)
                    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step != step + 1:  # global_step counts the step just ended
                    return
                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                device = torch.cuda.current_device()
                result = live_at_peak(snapshot["device_traces"][device], self.held["allocated"])
                result["held_at_start"] = self.held
                Path(path).write_text(json.dumps(result, indent=1))

        trainer.add_callback(Record())


def held_parts(trainer) -> dict:
    """Bytes allocated at a step's start, by owner: the student's weights, gradients and
    optimizer state, the teacher's weights (the rest: engine caches, CUDA graph pools,
    buffers)."""
    import torch

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda)

    student = list(trainer.model.parameters())
    optimizer = getattr(trainer, "optimizer", None)
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()]
    teacher = getattr(getattr(trainer, "teacher", None), "parameters", list)  # a teacher server's: none here
    return {"allocated": torch.cuda.memory_allocated(), "student weights": size(student),
            "student grads": size(p.grad for p in student if p.grad is not None),
            "optimizer state": size(state), "teacher weights": size(teacher())}


def live_at_peak(trace: list[dict], start_bytes: int) -> dict:
    """Replay one device's allocator trace (``torch.cuda.memory._snapshot``): the peak of
    allocated bytes and, at it, the traced allocations still alive, by site."""
    live, total, held = {}, start_bytes, start_bytes
    peak, at_peak = start_bytes, {}
    for event in trace:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = event
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_requested":
            if live.pop(addr, None) is None:
                held -= size  # something allocated before the recording
            total -= size
    sites = sum_by_key((site_of(e.get("frames", [])), e["size"]) for e in at_peak.values())
    return {"peak": peak, "held_at_peak": held if not at_peak else peak - sum(e["size"] for e in at_peak.values()),
            "sites": sorted(([k, v] for k, v in sites.items()), key=lambda kv: -kv[1])}


def sum_by_key(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        out[key] = out.get(key, 0) + value
    return out


def site_of(frames: list[dict]) -> str:
    """Where an allocation was made: the innermost Python frame outside torch's own code
    (torch.optim and torch.utils.checkpoint count as callers), e.g.
    ``modeling_qwen2.py:72 forward`` or ``chunked.py:270 forward``."""
    for frame in frames:
        name = frame.get("filename", "")
        if "/torch/" not in name or "/torch/optim/" in name:
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return "autograd backward (no Python frame)" if not frames else f"{Path(frames[0]['filename']).name} (torch)"


def peak_table(result: dict) -> str:
    """The step's peak: what was held when it began, and the largest sites alive at the peak."""
    gib = 2**30
    held = result["held_at_start"]
    rows = [(k, held[k]) for k in ("student weights", "student grads", "optimizer state", "teacher weights")]
    rows.append(("other, held at the step's start", held["allocated"] - sum(v for _, v in rows)))
    lines = [f"step peak {result['peak'] / gib:.2f} GiB; held at the step's start {held['allocated'] / gib:.2f} GiB "
             f"(still held at the peak: {result['held_at_peak'] / gib:.2f})", "",
             "| held at the step's start | GiB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / gib:.2f} |" for name, value in rows]
    lines += ["", "| allocated during the step, alive at its peak (by site) | GiB |", "| --- | ---: |"]
    lines += [f"| {site} | {value / gib:.3f} |" for site, value in result["sites"][:20]]
    return "\n".join(lines)
