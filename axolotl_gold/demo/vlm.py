"""Tiny local vision-language models and an image dataset (random weights, seconds).

``build_tiny_vlms(out)`` writes:

* ``out/student``: a LLaVA (SigLIP vision tower, Qwen2 language model) with the
  char tokenizer plus ``<image>``; 32x32 images, 16 image tokens each.
* ``out/teacher``: the same family and processor, a larger language model
  (same-family pair: JSD on shared ``pixel_values``).
* ``out/teacher_gemma3``: a Gemma 3 (another family: BPE tokenizer, its own chat
  template, ``<start_of_image>`` and 4 soft tokens per image, 28x28 images);
  cross-family pair: ULD.
* ``out/data/images/*.png`` and ``out/data/{train,eval}.jsonl``: chat rows whose
  user turn holds an image part (``{"type": "image", "path": ...}``) and a
  question; the assistant answers with the colour of the square in the image.

Everything works without torchvision (transformers' PIL image processors). CLI:
``python -m axolotl_gold.demo build-vlm OUT``.
"""

from __future__ import annotations

import json
import os
import random
import shutil

from axolotl_gold.demo.models import HEAD_DIM, make_config

IMAGE_SIZE = 32
PATCH = 8  # 16 image tokens per image for the LLaVA pair
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}

def _template(image: str, user: tuple[str, str], system: tuple[str, str], assistant: tuple[str, str], start: str = "") -> str:
    content = (
        "{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
        "{%- for part in c -%}{%- if part['type'] == 'image' -%}" + image + "{%- else -%}"
        "{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    )
    return (
        content + start + "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}" + system[0] + "{{ content(message['content']) }}" + system[1] +
        "{%- elif message['role'] == 'user' -%}" + user[0] + "{{ content(message['content']) }}" + user[1] +
        "{%- elif message['role'] == 'assistant' -%}" + assistant[0] + "{% generation %}"
        "{{ content(message['content']) }}" + assistant[1] + "{% endgeneration %}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + assistant[0] + "{%- endif -%}"
    )


# the char tokenizer's chat format with an image part rendered as <image>
LLAVA_CHAT_TEMPLATE = _template(
    "<image>", ("<|user|>", ""), ("<|system|>", ""), ("<|assistant|>", "<|end|>")
)
# the BPE tokenizer's format; Gemma3Processor expands <start_of_image>
GEMMA3_CHAT_TEMPLATE = _template(
    "<start_of_image>", ("[INST]", "[/INST]"), ("[SYS]", "[/SYS]"), ("", "</s>"), start="<s>"
)


def _vision_config(image_size: int, patch: int, hidden: int = 32):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )


def llava_processor(out_dir: str):
    """The LLaVA pair's processor (char tokenizer + ``<image>``), saved to ``out_dir``."""
    from transformers import LlavaProcessor, SiglipImageProcessorPil

    from axolotl_gold.demo.tokenizers import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
    )
    processor.save_pretrained(out_dir)
    return processor


def new_llava(processor, hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    text = make_config(tok, hidden, layers, 4 * hidden)
    config = LlavaConfig(
        vision_config=_vision_config(IMAGE_SIZE, PATCH),
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _with_generation_ids(LlavaForConditionalGeneration(config), tok)


def gemma3_processor(out_dir: str):
    """A Gemma 3 processor around the BPE tokenizer, saved to ``out_dir``."""
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    from axolotl_gold.demo.tokenizers import build_bpe_tokenizer

    tok_dir = os.path.join(out_dir, "_tokenizer")
    tok = build_bpe_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]},
        replace_extra_special_tokens=False,
    )
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    tok.save_pretrained(tok_dir)
    path = os.path.join(tok_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    # Gemma3Processor reads these names from the tokenizer (boi_token_id, image_token_id, ...)
    cfg["extra_special_tokens"] = {
        "boi_token": "<start_of_image>",
        "image_token": "<image_soft_token>",
        "eoi_token": "<end_of_image>",
    }
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
        tokenizer=tok,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=4,
    )
    processor.save_pretrained(out_dir)
    shutil.rmtree(tok_dir)
    return processor


def new_gemma3(processor, hidden: int, layers: int, seed: int):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    tok = processor.tokenizer
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        sliding_window=128,
        final_logit_softcapping=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_vision_config(28, 7),
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _with_generation_ids(Gemma3ForConditionalGeneration(config), tok)


def _with_generation_ids(model, tok):
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def write_images(out_dir: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` PNGs of a coloured square on a grey background: (path, colour name)."""
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        image = Image.new("RGB", (IMAGE_SIZE + rng.randint(0, 16), IMAGE_SIZE), (128, 128, 128))
        x, y = rng.randint(0, 12), rng.randint(0, 12)
        image.paste(COLORS[name], (x, y, x + 16, y + 16))
        path = os.path.join(out_dir, f"{seed}_{i}.png")
        image.save(path)
        out.append((path, name))
    return out


def vlm_row(image_path: str, answer: str | None) -> dict:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": image_path},
                {"type": "text", "text": "colour of the square?"},
            ],
        }
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"messages": messages}


def build_tiny_vlms(out_dir: str, n_train: int = 32, n_eval: int = 8, seed: int = 0) -> dict:
    """Student, same-family teacher, cross-family teacher and data under ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    paths = {name: os.path.join(out_dir, name) for name in ("student", "teacher", "teacher_gemma3")}
    processor = llava_processor(paths["student"])
    new_llava(processor, 64, 2, seed + 1).save_pretrained(paths["student"])
    llava_processor(paths["teacher"])
    new_llava(processor, 128, 2, seed).save_pretrained(paths["teacher"])
    gemma = gemma3_processor(paths["teacher_gemma3"])
    new_gemma3(gemma, 128, 2, seed).save_pretrained(paths["teacher_gemma3"])
    images = os.path.join(out_dir, "data", "images")
    os.makedirs(images, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1000)):
        path = os.path.join(out_dir, "data", f"{split}.jsonl")
        with open(path, "w") as f:
            for image_path, name in write_images(images, n, s):
                f.write(json.dumps(vlm_row(image_path, name)) + "\n")
        paths[split] = path
    return paths
