"""Rollouts sample the student's plain policy, and sampling leaves the training set-up as it was."""

import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.static import StaticCacheEngine
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from test_static_engine import EOS, PAD, _model, _prompts


def test_checkpoint_generation_config_does_not_change_the_policy():
    # Qwen2.5-Instruct ships repetition_penalty 1.1; generate() used to apply it
    model = _model()
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 2
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS})
    prompts = _prompts()
    assert hf.generate(prompts, seed=0) == fast.generate(prompts, seed=0)
    assert model.generation_config.repetition_penalty == 5.0  # restored


def test_checkpoint_generation_config_ignored_through_peft():
    from peft import LoraConfig, get_peft_model

    base = _model()
    base.generation_config.repetition_penalty = 5.0
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    greedy = SamplingSettings(max_new_tokens=24, temperature=0.0)
    hf = HFGenerateEngine(lambda: model, greedy, PAD, {EOS})
    fast = StaticCacheEngine(lambda: model, greedy, PAD, {EOS})
    prompts = _prompts()
    assert hf.generate(prompts, seed=0) == fast.generate(prompts, seed=0)
    assert base.generation_config.repetition_penalty == 5.0
    assert "generation_config" not in vars(model)


def test_gradient_checkpointing_survives_windows_unchanged():
    model = _model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    hooks = len(model.get_input_embeddings()._forward_hooks)
    settings = SamplingSettings(max_new_tokens=4, temperature=1.0)
    for engine in (HFGenerateEngine, StaticCacheEngine):
        for seed in range(3):
            engine(lambda: model, settings, PAD, {EOS}).generate(_prompts(), seed=seed)
    assert len(model.get_input_embeddings()._forward_hooks) == hooks
    assert model.is_gradient_checkpointing and model.training
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is True
    # and it still checkpoints in training: the backward runs through the reentrant path
    ids = torch.tensor([_prompts()[0]])
    model(input_ids=ids, labels=ids).loss.backward()
