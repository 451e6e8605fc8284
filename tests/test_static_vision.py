"""The static engine on prompts with images (tiny local LLaVA and Gemma 3): the processor's
batch is prefilled through HF's own forward, the decode steps are the text ones; against
HF ``generate`` on the same inputs."""

import json

import pytest
import torch

from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.rollouts.engines.static import StaticCacheEngine
from axolotl_gold.vision.batch import GoldVisionCollator, VisionEncoder, rollout_inputs

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0.0)


def _setup(tiny_vlms, name: str, rows: int = 3):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    encoder = VisionEncoder(AutoProcessor.from_pretrained(tiny_vlms[name]), max_prompt_length=100)
    data = [json.loads(line) for line in open(tiny_vlms["train"])][:rows]
    data[1]["messages"][0]["content"][1]["text"] = "what colour is the square in this picture?"  # left padding
    rollouts = GoldVisionCollator(encoder, {}, max_completion_length=8)(data)["gold_rollouts"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlms[name], dtype=torch.float32).eval()
    return encoder, model, [r.prompt_ids for r in rollouts], rollout_inputs(encoder)(rollouts)


@pytest.mark.parametrize("name", ["student", "teacher_gemma3"])  # LLaVA; Gemma 3 (token_type_ids)
def test_greedy_with_images_matches_generate(tiny_vlms, name):
    encoder, model, prompts, inputs = _setup(tiny_vlms, name)
    eos = {encoder.tokenizer.eos_token_id}
    expected = HFGenerateEngine(lambda: model, GREEDY, encoder.pad_id, eos).generate(prompts, 0, model_inputs=inputs)
    engine = StaticCacheEngine(lambda: model, GREEDY, encoder.pad_id, eos, batch_size=2)
    assert engine.generate(prompts, 0, model_inputs=inputs) == expected
    assert engine.fallbacks == 0 and engine.refills == 0  # one processor batch: never split
    assert len({len(p) for p in prompts}) > 1  # the case under test: left padding


def test_sampling_with_images_is_seeded_and_never_emits_image_tokens(tiny_vlms):
    encoder, model, prompts, inputs = _setup(tiny_vlms, "student")
    image_id, eos = encoder.processor.image_token_id, encoder.tokenizer.eos_token_id
    sampled = SamplingSettings(max_new_tokens=10, temperature=1.0, top_p=0.9)
    guarded = StaticCacheEngine(lambda: model, sampled, encoder.pad_id, {eos},
                                generate_kwargs={"suppress_tokens": encoder.vision_token_ids})
    first = guarded.generate(prompts, 3, model_inputs=inputs)
    assert first == guarded.generate(prompts, 3, model_inputs=inputs)
    assert first != guarded.generate(prompts, 4, model_inputs=inputs)
    # a head that always prefers the image token, then EOS: suppressed, EOS comes first
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.zero_()
    head.bias.data.zero_()
    head.bias.data[image_id], head.bias.data[eos] = 100.0, 50.0
    model.lm_head = head
    plain = StaticCacheEngine(lambda: model, GREEDY, encoder.pad_id, {eos})
    assert plain.generate(prompts, 0, model_inputs=inputs)[0][0] == image_id
    guarded.sampling = GREEDY
    assert guarded.generate(prompts, 0, model_inputs=inputs) == [[eos]] * len(prompts)


def test_generate_keywords_other_than_suppress_tokens_are_refused():
    with pytest.raises(ValueError, match="cache_implementation"):
        StaticCacheEngine(lambda: None, GREEDY, 0, {1}, generate_kwargs={"cache_implementation": "static"})


def test_a_model_with_its_own_rotary_positions_falls_back_to_generate():
    """Qwen2-VL places 3-D rotary positions for images itself (``get_rope_index``); the
    decode step passes 1-D ones, so prompts with images go through ``generate``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
                           vocab_size=300, eos_token_id=1, pad_token_id=0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    expected = HFGenerateEngine(lambda: model, GREEDY, 0, {1}).generate(prompts, 0, model_inputs=inputs)
    engine = StaticCacheEngine(lambda: model, GREEDY, 0, {1})
    assert engine.generate(prompts, 0, model_inputs=inputs) == expected
    assert engine.fallbacks == 1
    # without images the positions are 1-D: the engine serves it
    assert engine.generate(prompts, 0) == HFGenerateEngine(lambda: model, GREEDY, 0, {1}).generate(prompts, 0)
    assert engine.fallbacks == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decode step needs a CUDA device")
def test_cuda_graph_decode_with_images_matches_generate(tiny_vlms):
    encoder, model, prompts, inputs = _setup(tiny_vlms, "student")
    model = model.cuda()
    eos = {encoder.tokenizer.eos_token_id}
    expected = HFGenerateEngine(lambda: model, GREEDY, encoder.pad_id, eos).generate(prompts, 0, model_inputs=inputs)
    engine = StaticCacheEngine(lambda: model, GREEDY, encoder.pad_id, eos)
    assert engine.generate(prompts, 0, model_inputs=inputs) == expected
    assert engine.graphs_captured == 1 and engine.fallbacks == 0


def test_fused_projections_serve_the_text_decoder_alone_with_images(tiny_vlms):
    """A vision-language student's fused decode (``fuse_projections``): the language model's
    projections are grouped, the vision tower's (CLIP's q/k/v, run only in the prefill) are not,
    and greedy output with images equals HF generate."""
    from axolotl_gold.rollouts.engines.fused_projections import fused_groups

    encoder, model, prompts, inputs = _setup(tiny_vlms, "student")
    eos = {encoder.tokenizer.eos_token_id}
    vision = {id(m) for m in model.model.vision_tower.modules()}
    assert any(hasattr(m, "q_proj") for m in model.model.vision_tower.modules())  # the case under test
    groups = fused_groups(model)
    assert groups and not any(id(parent) in vision for parent, _, _ in groups)
    expected = HFGenerateEngine(lambda: model, GREEDY, encoder.pad_id, eos).generate(prompts, 0, model_inputs=inputs)
    engine = StaticCacheEngine(lambda: model, GREEDY, encoder.pad_id, eos, fuse_projections=True)
    assert engine.generate(prompts, 0, model_inputs=inputs) == expected
