"""Dataset strategy for conversations with images: ``type: axolotl_gold.vision.chat_template``.

Axolotl's multimodal settings (``processor_type``, ``skip_prepare_dataset: true``,
``remove_unused_columns: false``) hand the raw rows to the trainer and never call
a dataset strategy, so this one runs where the rows really go:

- before training, :func:`check_rows` reads every row once (message fields, image
  placeholders against the ``images`` column, that each image path exists and its
  header decodes) and fails with the row's index;
- per micro-batch, :class:`~axolotl_gold.vision.batch.GoldVisionCollator` splits a
  row into prompt / completion / images with the same functions, decodes the
  images and applies the student's processor.

The dataset keys of ``type: chat_template`` apply (``field_messages``,
``message_property_mappings``, ``roles``), plus ``field_images`` (default ``images``).
GOLD routes ``type: chat_template`` here when ``processor_type`` is set.
"""

from __future__ import annotations

from axolotl_gold.config.errors import GoldConfigError
from axolotl_gold.data.chat_template import normalize_messages
from axolotl_gold.vision.rows import open_image, split_vision_row

VISION_DATASET_TYPE = "axolotl_gold.vision.chat_template"


def check_rows(dataset, ds_cfg: dict | None, lmbda: float, base_dirs: tuple[str, ...] = ()) -> int:
    """Validate every row without decoding pixels; returns the number of images."""
    ds_cfg = dict(ds_cfg or {})
    images_field = ds_cfg.get("field_images") or "images"
    total = 0
    for index, row in enumerate(dataset):
        try:
            messages = normalize_messages(row, ds_cfg)
        except KeyError as err:
            raise GoldConfigError(
                f"dataset row {index} has no messages field {err}: set `field_messages` "
                "in the dataset section to the column that holds the conversation."
            ) from err
        parsed = split_vision_row(messages, row.get(images_field), index, images_field)
        if not any(m.get("role") == "user" for m in parsed.prompt_messages):
            raise GoldConfigError(
                f"dataset row {index} has no user message before the last assistant turn: "
                "fix the row or `field_messages` / `message_property_mappings`."
            )
        if parsed.completion is None and lmbda < 1.0:
            raise GoldConfigError(
                f"dataset row {index} has no assistant turn (prompt-only), which needs "
                f"`lmbda: 1.0` (every slice sampled on-policy); `lmbda` is {lmbda}."
            )
        for spec in parsed.images:
            open_image(spec, f"dataset row {index}", base_dirs, load=False)
        total += len(parsed.images)
    return total


def load(tokenizer, cfg, ds_cfg=None, processor=None):  # noqa: ARG001 - axolotl's signature
    """Called by Axolotl only when it prepares the dataset itself, which image rows
    cannot go through (the raw images must reach the collator)."""
    raise GoldConfigError(
        f"`type: {VISION_DATASET_TYPE}` needs `skip_prepare_dataset: true` (and "
        "`processor_type`, e.g. `AutoProcessor`): the rows and their images go to the "
        "GOLD collator as they are."
    )
