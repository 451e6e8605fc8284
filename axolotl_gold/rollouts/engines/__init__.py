"""Rollout engines: where a window's completions come from."""

from axolotl_gold.rollouts.engines.base import RolloutEngine, SamplingSettings, trim_completion

__all__ = ["RolloutEngine", "SamplingSettings", "trim_completion"]
