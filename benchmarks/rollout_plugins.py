"""Benchmark-only plugins that `axolotl train` loads from the benchmarks' YAMLs (bench_cli.py,
real_sizes.py, bench_multi_gpu.py): rollouts forced to a fixed length, each engine call's
completion lengths recorded (--ragged), HF's NaN filter of the logged loss put back
(--nan-inf-filter: the wait per micro-step the trainer removes, timed)."""

from __future__ import annotations

import json
import os

from axolotl.integrations.base import BasePlugin


class FixedLengthRollouts(BasePlugin):
    """Benchmark only: EOS suppressed until GOLD_BENCH_MIN_NEW_TOKENS new tokens."""

    def post_trainer_create(self, cfg, trainer):
        engine = getattr(trainer, "student_engine", None)
        if engine is not None:
            engine.min_new_tokens = int(os.environ.get("GOLD_BENCH_MIN_NEW_TOKENS", "0"))


class RolloutLengths(BasePlugin):
    """Benchmark only (--ragged): each student engine call's completion lengths, one JSON
    line a call, appended to GOLD_BENCH_LENGTHS."""

    def post_trainer_create(self, cfg, trainer):
        engine, path = getattr(trainer, "student_engine", None), os.environ.get("GOLD_BENCH_LENGTHS")
        if engine is None or not path:
            return
        generate = engine.generate

        def recorded(prompts, seed, model_inputs=None):
            out = generate(prompts, seed=seed, model_inputs=model_inputs)
            with open(path, "a") as f:
                f.write(json.dumps([len(c) for c in out]) + "\n")
            return out

        engine.generate = recorded


class NanInfFilter(BasePlugin):
    """Benchmark only (--nan-inf-filter): HF's ``logging_nan_inf_filter`` back on (its default,
    which the GOLD trainer turns off: a host read of every micro-step's loss)."""

    def post_trainer_create(self, cfg, trainer):
        trainer.args.logging_nan_inf_filter = True
