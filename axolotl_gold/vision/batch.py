"""A model's processor at collation time: prompts with images to tensors.

:class:`VisionEncoder` wraps one processor (the student's, or a cross-family
teacher's). It renders a prompt with the processor's chat template, expands the
image placeholders into the model's own image tokens, and builds the vision
tensors (``pixel_values`` and whatever else the processor returns) for a batch of
rows. The scoring batch is the text one of :mod:`axolotl_gold.data.batching` (prompt
left-padded, completion right-padded) plus ``vision``: the processor's tensors for
the same rows, per-token ones (e.g. Gemma 3's ``token_type_ids``) extended over
the completion with zeros (text).

:class:`GoldVisionCollator` turns raw dataset rows into :class:`Rollout` rows,
decoding their images only now, per micro-batch.
"""

from __future__ import annotations

import os
import re

import torch

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.batching import Rollout, build_scoring_batch
from axolotl_gold.data.chat_template import completion_ids_for, normalize_messages
from axolotl_gold.vision.rows import open_image, split_vision_row

_TEXT_KEYS = ("input_ids", "attention_mask")
_KNOWN_NAMES = (
    "image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "image_start_token_id",
    "image_end_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
)
_VISION_NAME = re.compile(r"^(image|video|vision|boi|eoi|bov|eov|start_image|end_image)")


class VisionEncoder:
    """One processor's view of prompts with images (see the module doc)."""

    def __init__(self, processor, max_prompt_length: int):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_prompt_length = max_prompt_length
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        owner = processor if getattr(processor, "chat_template", None) else self.tokenizer
        if getattr(owner, "chat_template", None) is None:
            raise GoldConfigError(
                f"the processor {type(processor).__name__} has no chat template: set "
                "`chat_template` or use a processor that ships one."
            )
        self._template = owner

    @property
    def vision_token_ids(self) -> list[int]:
        """Ids that stand for image (or video) inputs: a completion must never hold
        one (the model would look for features that do not exist), so rollouts
        suppress them."""
        ids = set()
        for owner in (self.processor, self.tokenizer):
            for name in sorted(set(dir(owner)) | set(_KNOWN_NAMES)):
                if name.endswith("token_id") and _VISION_NAME.match(name):
                    try:
                        value = getattr(owner, name)
                    except (AttributeError, ValueError, KeyError):
                        continue
                    if isinstance(value, int) and value != self.tokenizer.unk_token_id:
                        ids.add(value)
        return sorted(ids)

    def render(self, messages: list[dict]) -> str:
        return self._template.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def completion_ids(self, prompt_messages: list[dict], completion: str) -> list[int]:
        return completion_ids_for(self.tokenizer, prompt_messages, completion, template=self._template)

    def _process(self, texts: list[str], images: list[list]) -> dict:
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": "left"}
        if any(images):
            kwargs["images"] = images
        return dict(self.processor(**kwargs))

    def _fits(self, ids: list[int]) -> list[int]:
        if len(ids) > self.max_prompt_length:
            raise GoldConfigError(
                f"a prompt with its image tokens is {len(ids)} tokens, more than the "
                f"{self.max_prompt_length} that `sequence_len` - `max_completion_length` leaves "
                "(image prompts are never cut): raise `sequence_len`, lower "
                "`max_completion_length`, or use smaller images."
            )
        return ids

    def prompt_ids(self, text: str, images: list) -> list[int]:
        return self._fits(self._process([text], [images])["input_ids"][0].tolist())

    @staticmethod
    def _unpadded(out: dict) -> list[list[int]]:
        return [ids[mask.bool()].tolist() for ids, mask in zip(out["input_ids"], out["attention_mask"])]

    def model_inputs(self, texts: list[str], images: list[list], prompts: list[list[int]]) -> dict:
        """The processor's tensors for a left-padded prompt batch (what ``generate`` takes)."""
        out = self._process(texts, images)
        for row, (got, prompt) in enumerate(zip(self._unpadded(out), prompts)):
            if got != list(prompt):
                raise RuntimeError(
                    f"the processor encoded prompt {row} differently on a second call "
                    f"({len(got)} vs {len(prompt)} tokens): it is not deterministic"
                )
        return out

    def scoring_batch(self, prompts, completions, texts, images) -> dict:
        """The text scoring batch plus ``vision`` (no ``position_ids``: multimodal
        models place image tokens themselves, e.g. Qwen2-VL's 3D rotary positions).

        ``prompts=None``: this processor encodes the prompts here, once (a cross-family
        teacher's own prompt tokens); otherwise they are checked against its output.
        """
        if prompts is None:
            out = self._process(texts, images)
            prompts = [self._fits(ids) for ids in self._unpadded(out)]
        else:
            out = self.model_inputs(texts, images, prompts)
        batch = build_scoring_batch(prompts, completions, self.pad_id)
        batch.pop("position_ids")
        width = batch["completion_labels"].shape[1]
        rows, prompt_width = out["input_ids"].shape
        vision = {}
        for key, value in out.items():
            if key in _TEXT_KEYS or not isinstance(value, torch.Tensor):
                continue
            if value.dim() >= 2 and tuple(value.shape[:2]) == (rows, prompt_width):
                pad = value.new_zeros((rows, width, *value.shape[2:]))
                value = torch.cat([value, pad], dim=1)  # per-token: completion is text
            vision[key] = value
        batch["vision"] = vision
        return batch


class GoldVisionCollator:
    """Raw conversation rows with images to :class:`Rollout` rows (images decoded here)."""

    def __init__(self, encoder: VisionEncoder, ds_cfg: dict | None, max_completion_length: int):
        self.encoder = encoder
        self.ds_cfg = dict(ds_cfg or {})
        self.images_field = self.ds_cfg.get("field_images") or "images"
        self.max_completion = max_completion_length
        path = self.ds_cfg.get("path")
        base = os.path.dirname(path) if path and os.path.isfile(path) else path
        self.base_dirs = (base,) if base and os.path.isdir(base) else ()

    def rollout(self, row: dict, index) -> Rollout:
        where = f"dataset row {index}"
        messages = normalize_messages(row, self.ds_cfg)
        parsed = split_vision_row(messages, row.get(self.images_field), index, self.images_field)
        images = [open_image(spec, where, self.base_dirs) for spec in parsed.images]
        text = self.encoder.render(parsed.prompt_messages)
        prompt_ids = self.encoder.prompt_ids(text, images)
        completion_ids = []
        if parsed.completion is not None:
            completion_ids = self.encoder.completion_ids(parsed.prompt_messages, parsed.completion)
            if set(completion_ids) & set(self.encoder.vision_token_ids):
                raise GoldConfigError(
                    f"{where}: the assistant's answer contains an image token "
                    "(e.g. a literal image placeholder string); completions are text: remove it."
                )
        return Rollout(
            prompt_ids=prompt_ids,
            completion_ids=completion_ids[: self.max_completion],
            prompt_messages=parsed.prompt_messages,
            completion_text=parsed.completion or "",
            images=images,
            prompt_text=text,
        )

    def __call__(self, rows: list[dict]) -> dict:
        return {"gold_rollouts": [self.rollout(row, row.get("gold_row", "(in this batch)")) for row in rows]}


def rollout_inputs(vision):
    """Rows to the processor's left-padded prompt batch, for the rollout engine."""

    def encode(rows: list[Rollout]) -> dict:
        return vision.model_inputs(
            [r.prompt_text for r in rows], [r.images for r in rows], [r.prompt_ids for r in rows]
        )

    return encode
