"""Benchmark-only plugins that `axolotl train` loads from the benchmarks' YAMLs (bench_cli.py,
real_sizes.py, bench_multi_gpu.py): rollouts forced to a fixed length, each engine call's
completion lengths recorded (--ragged), HF's NaN filter of the logged loss put back
(--nan-inf-filter: the wait per micro-step the trainer removes, timed), one step profiled
(--profile-step: step_profile.py's idle gaps and host waits)."""

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


class StepProfile(BasePlugin):
    """Benchmark only (--profile-step): optimizer step GOLD_BENCH_PROFILE_STEP (0-based) under
    torch.profiler (host ops with Python stacks, CUDA kernels), from HF's step begin to its step
    end (the window's generation included where the step starts it); ``step_profile.report``
    written to GOLD_BENCH_PROFILE_OUT."""

    def post_trainer_create(self, cfg, trainer):
        step, out = os.environ.get("GOLD_BENCH_PROFILE_STEP"), os.environ.get("GOLD_BENCH_PROFILE_OUT")
        if step is None or not out:
            return
        import torch
        from transformers import TrainerCallback

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        class Profile(TrainerCallback):
            profiler = None

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == int(step) and self.profiler is None:
                    self.profiler = torch.profiler.profile(activities=activities, with_stack=True)
                    self.profiler.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if not self.profiler:  # not started yet (None) or done (False)
                    return
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the step's last kernels inside the profile
                self.profiler.__exit__(None, None, None)
                from step_profile import report

                with open(out, "w") as f:
                    f.write(f"optimizer step {step} of `axolotl train`\n\n{report(self.profiler.events())}\n")
                self.profiler = False  # once

        trainer.add_callback(Profile())
