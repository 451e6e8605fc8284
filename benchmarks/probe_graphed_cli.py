"""Which part of the GPU suite's run gives NaN gradients under CUDA graphs of the student.

The suite's case ``torch-compile-graphs-full`` (``torch_compile_mode: reduce-overhead``,
tiny bf16 llama with tied embeddings, an evaluation before the first step, prompts of
different lengths) got a NaN gradient norm in its first step, where ``bench_cli.py``'s
0.5B run (no evaluation, fixed lengths) trained with the eager run's norms. This runs that
case and variants of it through `axolotl train` at once on the one GPU, each with the
``grad_watch.GradWatch`` plugin, and prints per variant and micro-step the loss, the
batch's shape and which parameters' gradients are not finite.

    GOLD_PROBE_VARIANTS=suite,no-eval python benchmarks/probe_graphed_cli.py [--out DIR]

(default variants: ``DEFAULT``). Seventeenth session, one H100: the suite's case got NaN in every
gradient at its second micro-batch, 192 wide (the first, 256 wide, was finite); float32 and
no graphs (widths 146 to 208) were finite, a cudagraph-tree step per micro-step did not help.
192 = 128 + 64: cuDNN's attention backward (pytorch/pytorch#196678), which the trainer now
avoids (``trainer.attention_backends``); ``cudnn-attention`` and ``eager-cudnn-attention`` undo
that to show the NaN again, with and without graphs, on the masked layout (the rows rolled left,
``scoring.causal_rows``, leave no query attending to nothing).

(on the GPU machine through ``GOLD_BENCH=graphs-probe bash scripts/gpu_bench.sh``)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "gpu"), str(HERE.parent / "tests")]

from axolotl_run import with_overrides  # noqa: E402
from gpu_cases import base_config  # noqa: E402
from gpu_harness import last_error, launch  # noqa: E402
from gpu_models import Assets  # noqa: E402

GRAPHED = {"torch_compile": True, "torch_compile_mode": "reduce-overhead", "gradient_checkpointing": False}
VARIANTS = {
    "suite": {},  # the GPU suite's case as it is
    "no-eval": {"val_set_size": 0, "eval_strategy": None, "eval_steps": None},
    "one-width": {"gold_scoring_width_multiple": 256},  # every micro-batch 256 wide: one shape
    "eager-attention": {"attn_implementation": "eager"},  # no SDPA kernels
    "no-trees": {},  # inductor's older CUDA graphs (no cudagraph trees)
    "static-shapes": {},  # a graph per width, no dynamic-shape graph
    "fp32": {"bf16": False, "tf32": False},  # float32 weights, no autocast
    "no-graphs": {"torch_compile_mode": "default"},  # the control: compiled, no CUDA graphs
    "mark-step": {},  # the suite's case, a new cudagraph-tree step at each micro-step (grad_watch)
    "cudnn-attention": {},  # the suite's case with cuDNN's attention in the step (the fix undone)
    "eager-cudnn-attention": {"torch_compile": None, "torch_compile_mode": None,  # no compile at all,
                              "gold_scoring_width_multiple": 64},  # the widths the graphs had
}
DEFAULT = "suite,cudnn-attention,eager-cudnn-attention,no-graphs"
# the fix undone on the layout that shows the bug: rows as laid out, with the padding mask (rolled
# left, ``scoring.causal_rows``, no query attends to nothing and cuDNN's backward has no NaN to give)
UNDO_FIX = ("axolotl_gold.trainer.attention_backends.EXCLUDE_CUDNN_ATTENTION=False;"
            "axolotl_gold.scoring.causal_rows.ROLL_ROWS=False")
ENV = {
    "mark-step": {"GOLD_GRAD_WATCH_MARK_STEP": "1"},
    "no-trees": {"GOLD_GRAD_WATCH_SET": "torch._inductor.config.triton.cudagraph_trees=False"},
    "static-shapes": {"GOLD_GRAD_WATCH_SET": "torch._dynamo.config.automatic_dynamic_shapes=False"},
    "cudnn-attention": {"GOLD_GRAD_WATCH_SET": UNDO_FIX},
    "eager-cudnn-attention": {"GOLD_GRAD_WATCH_SET": UNDO_FIX},
}


def run_variant(name: str, pair: dict, root: Path, timeout: float) -> dict:
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    cfg = with_overrides(base_config(pair, str(work)), {**GRAPHED, **VARIANTS[name]})
    cfg["plugins"] = [*cfg["plugins"], "grad_watch.GradWatch"]
    watch = work / "grad_watch.jsonl"
    start = time.monotonic()
    rc, log = launch(cfg, work, timeout, {"GOLD_GRAD_WATCH_OUT": str(watch), **ENV.get(name, {})})
    records = [json.loads(line) for line in watch.read_text().splitlines()] if watch.exists() else []
    return {"variant": name, "rc": rc, "wall_s": round(time.monotonic() - start, 1),
            "error": "" if rc == 0 else last_error(log), "micro_steps": records,
            "grad_norms": [line.split("'grad_norm': ")[1].split(",")[0] for line in log.splitlines()
                           if "'grad_norm': " in line]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="probe_graphed_"))
    p.add_argument("--timeout", type=float, default=float(os.environ.get("GOLD_PROBE_S", "300")))
    args = p.parse_args()
    names = [n for n in os.environ.get("GOLD_PROBE_VARIANTS", DEFAULT).split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"GOLD_PROBE_VARIANTS: unknown {sorted(unknown)}; known {sorted(VARIANTS)}")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    root = Path(tempfile.mkdtemp(prefix="probe_graphed_runs_"))
    pair = Assets(root / "models", cpu=False).get("llama")
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: run_variant(n, pair, root / "runs", args.timeout), names))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_graphed.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"## {r['variant']}: rc {r['rc']}, {r['wall_s']} s, grad norms {r['grad_norms']} {r['error']}")
        for m in r["micro_steps"]:
            print(f"  step {m['step']} micro {m['micro']} width {m['width']} loss {m['loss']:.4f} "
                  f"non-finite {m['nonfinite']} {m['first']}")


if __name__ == "__main__":
    main()
