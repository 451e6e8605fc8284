"""Vision batches on tiny local VLMs: what the student and the teacher read."""

import pytest
import torch
from PIL import Image

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.batching import Rollout
from axolotl_gold.rollouts.window import fill_window
from axolotl_gold.rollouts.engines.base import SamplingSettings
from axolotl_gold.rollouts.engines.hf import HFGenerateEngine
from axolotl_gold.scoring.forward import completion_states
from axolotl_gold.scoring.loss import scoring_batch
from axolotl_gold.vision.batch import rollout_inputs
from axolotl_gold.vision.batch import GoldVisionCollator, VisionEncoder


def _processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _rows(paths):
    """Two rows with prompts of different lengths (so one is left-padded)."""
    import json

    rows = [json.loads(line) for line in open(paths["train"])][:2]
    rows[1]["messages"][0]["content"][1]["text"] = "what colour is the square in this picture?"
    return rows


@pytest.fixture(scope="module")
def student_side(tiny_vlms):
    encoder = VisionEncoder(_processor(tiny_vlms["student"]), max_prompt_length=100)
    collator = GoldVisionCollator(encoder, {}, max_completion_length=8)
    return encoder, collator


def test_collated_rows_hold_images_and_completion_only_labels(tiny_vlms, student_side):
    encoder, collator = student_side
    rollouts = collator(_rows(tiny_vlms))["gold_rollouts"]
    image_id = encoder.processor.image_token_id
    tok = encoder.tokenizer
    for r in rollouts:
        assert len(r.images) == 1 and isinstance(r.images[0], Image.Image)
        assert r.prompt_ids.count(image_id) == 16  # 32x32 image, 8x8 patches
        assert r.completion_ids[-1] == tok.eos_token_id
        assert tok.decode(r.completion_ids, skip_special_tokens=True) == r.completion_text
    batch = scoring_batch(rollouts, encoder.pad_id, encoder)
    labels = batch["completion_labels"]
    width = labels.shape[1]
    for row, r in enumerate(rollouts):
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == r.completion_ids  # the completion, nothing of the prompt
        assert batch["input_ids"][row, -width:][: len(kept)].tolist() == kept
    assert set(batch["vision"]) == {"pixel_values"} and batch["vision"]["pixel_values"].shape[0] == 2
    assert "position_ids" not in batch


def test_padded_vision_batch_scores_like_each_row_alone(tiny_vlms, student_side):
    """Left padding, no position ids, shared pixel batch: same logits as one row at a time."""
    encoder, collator = student_side
    model = _model(tiny_vlms["student"])
    rollouts = collator(_rows(tiny_vlms))["gold_rollouts"]
    assert len(rollouts[0].prompt_ids) != len(rollouts[1].prompt_ids)
    batch = scoring_batch(rollouts, encoder.pad_id, encoder)
    with torch.no_grad():
        states = completion_states(model, batch, use_head_bypass=False).values
        for row, r in enumerate(rollouts):
            alone = encoder.processor(text=[r.prompt_text], images=[r.images], return_tensors="pt")
            ids = torch.cat([alone["input_ids"], torch.tensor([r.completion_ids])], dim=1)
            logits = model(input_ids=ids, pixel_values=alone["pixel_values"]).logits[0]
            n = len(r.completion_ids)
            expected = logits[len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + n]
            torch.testing.assert_close(states[row, :n], expected, atol=1e-4, rtol=1e-4)


def test_same_family_teacher_reads_the_students_vision_inputs(tiny_vlms, student_side):
    from axolotl_gold.scoring.objectives import JsdObjective

    encoder, collator = student_side
    rollouts = collator(_rows(tiny_vlms))["gold_rollouts"]
    batch = scoring_batch(rollouts, encoder.pad_id, encoder)
    assert JsdObjective(beta=0.5, temperature=1.0).teacher_inputs(rollouts) is None  # teacher reads `batch` as is
    teacher = _model(tiny_vlms["teacher"])
    with torch.no_grad():
        out = completion_states(teacher, batch, use_head_bypass=True)
    assert out.head is not None and out.values.shape[:2] == batch["completion_labels"].shape


def test_cross_family_teacher_gets_its_own_prompt_image_tokens_and_pixels(tiny_vlms, student_side):
    from axolotl_gold.crosstok.teacher_inputs import CrossTokenizerInputs

    encoder, collator = student_side
    rollouts = collator(_rows(tiny_vlms))["gold_rollouts"]
    t_proc = _processor(tiny_vlms["teacher_gemma3"])
    inputs = CrossTokenizerInputs(
        student_tokenizer=encoder.tokenizer,
        teacher_tokenizer=t_proc.tokenizer,
        max_prompt_length=100,
        teacher_vision=VisionEncoder(t_proc, 100),
    )
    extra = inputs(rollouts)
    teacher = extra["teacher"]
    tok = t_proc.tokenizer
    for row, r in enumerate(rollouts):
        ids = teacher["input_ids"][row][teacher["attention_mask"][row].bool()].tolist()
        assert ids.count(tok.image_token_id) == 4 and ids.count(tok.boi_token_id) == 1
        assert encoder.processor.image_token_id not in ids or encoder.processor.image_token_id == tok.image_token_id
        assert ids[:1] == [tok.convert_tokens_to_ids("<s>")]  # the teacher's own template
        comp = extra["uld_teacher_ids"][row]
        assert tok.decode(comp, skip_special_tokens=True) == r.completion_text
    pixels = teacher["vision"]["pixel_values"]
    assert pixels.shape == (2, 3, 28, 28)  # the teacher's processor, the same two images
    # Gemma 3's per-token ids cover the completion too, as text (0)
    tti = teacher["vision"]["token_type_ids"]
    assert tti.shape == teacher["input_ids"].shape
    width = teacher["completion_labels"].shape[1]
    assert tti[:, -width:].abs().sum() == 0 and tti.sum() == 8
    model = _model(tiny_vlms["teacher_gemma3"])
    with torch.no_grad():
        out = completion_states(model, teacher, use_head_bypass=True)
    assert torch.isfinite(out.values).all()


def test_rollouts_sample_with_images_once_and_never_emit_image_tokens(tiny_vlms, student_side):
    encoder, collator = student_side
    model = _model(tiny_vlms["student"])
    image_id = encoder.processor.image_token_id
    eos = encoder.tokenizer.eos_token_id
    # a head that always prefers the image token, then EOS
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.zero_()
    head.bias.data.zero_()
    head.bias.data[image_id] = 100.0
    head.bias.data[eos] = 50.0
    model.lm_head = head
    rollouts = collator(_rows(tiny_vlms))["gold_rollouts"]
    sampling = SamplingSettings(max_new_tokens=4, temperature=0)
    plain = HFGenerateEngine(lambda: model, sampling, encoder.pad_id, {eos})
    guarded = HFGenerateEngine(
        lambda: model, sampling, encoder.pad_id, {eos},
        generate_kwargs={"suppress_tokens": encoder.vision_token_ids},
    )
    inputs = rollout_inputs(encoder)(rollouts)
    assert plain.generate([r.prompt_ids for r in rollouts], 0, model_inputs=inputs)[0][0] == image_id
    window = fill_window([rollouts[:1], rollouts[1:]], [True, True], guarded, 0, encode=rollout_inputs(encoder))
    assert guarded.calls == 1
    assert [r.completion_ids for s in window.slices for r in s] == [[eos], [eos]]


def test_text_rows_take_the_text_path(tiny_vlms, student_side):
    encoder, collator = student_side
    row = {"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "d"}]}
    rollouts = collator([row, row])["gold_rollouts"]
    assert rollouts[0].images == []
    batch = scoring_batch(rollouts, encoder.pad_id, encoder)
    assert "vision" not in batch and "position_ids" in batch

    class Recorder:
        calls = 0

        def generate(self, prompts, seed, model_inputs=None):
            self.calls += 1
            self.model_inputs = model_inputs
            return [[1] for _ in prompts]

    engine = Recorder()
    fill_window([rollouts], [True], engine, 0, encode=rollout_inputs(encoder))
    assert engine.calls == 1 and engine.model_inputs is None


def test_a_prompt_too_long_for_its_image_tokens_names_the_keys(tiny_vlms):
    encoder = VisionEncoder(_processor(tiny_vlms["student"]), max_prompt_length=10)
    collator = GoldVisionCollator(encoder, {}, max_completion_length=8)
    with pytest.raises(GoldConfigError, match="sequence_len.*max_completion_length"):
        collator(_rows(tiny_vlms))


def test_pair_checks_before_loading(tiny_vlms, tiny_pair):
    from transformers import AutoConfig

    from axolotl_gold.vision.setup import check_vision_pair

    cfg = {"base_model": tiny_vlms["student"], "teacher_model": tiny_vlms["teacher_gemma3"]}
    with pytest.raises(GoldConfigError, match="use_uld_loss: true"):
        check_vision_pair(cfg, AutoConfig.from_pretrained(cfg["teacher_model"]))
    check_vision_pair({**cfg, "use_uld_loss": True}, AutoConfig.from_pretrained(cfg["teacher_model"]))
    same = {"base_model": tiny_vlms["student"], "teacher_model": tiny_vlms["teacher"]}
    check_vision_pair(same, AutoConfig.from_pretrained(same["teacher_model"]))
    text_teacher = {"base_model": tiny_vlms["student"], "teacher_model": tiny_pair["teacher"]}
    with pytest.raises(GoldConfigError, match="teacher_model: .* is text-only"):
        check_vision_pair(text_teacher, AutoConfig.from_pretrained(tiny_pair["teacher"]))
    text_student = {"base_model": tiny_pair["student"], "teacher_model": tiny_vlms["teacher"]}
    with pytest.raises(GoldConfigError, match="base_model: .* has no vision tower"):
        check_vision_pair(text_student, AutoConfig.from_pretrained(tiny_vlms["teacher"]))


def test_vision_tower_is_frozen_lora_adapters_included(tiny_vlms):
    from peft import LoraConfig, get_peft_model

    from axolotl_gold.vision.setup import freeze_vision_tower

    model = _model(tiny_vlms["student"])
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert freeze_vision_tower(model) == tower
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    lora = get_peft_model(_model(tiny_vlms["student"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert freeze_vision_tower(lora) > 0
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)


def test_plugin_check_runs_the_pair_check_before_loading(tiny_vlms):
    from axolotl_gold.models.compatibility import check_teacher_compatible

    cfg = {
        "base_model": tiny_vlms["student"],
        "teacher_model": tiny_vlms["teacher_gemma3"],
        "processor_type": "AutoProcessor",
    }
    with pytest.raises(GoldConfigError, match="use_uld_loss: true"):
        check_teacher_compatible(cfg)
    check_teacher_compatible({**cfg, "teacher_model": tiny_vlms["teacher"]})
