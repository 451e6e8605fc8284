"""Vision-language set-up the plugin runs: checks before loading, processors, freezing."""

from __future__ import annotations

import logging
import os

from axolotl_gold.config.errors import GoldConfigError

LOG = logging.getLogger(__name__)

VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")


def is_vision_config(config) -> bool:
    """A vision-language model's config (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def _processor(path: str, revision=None, **kwargs):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, revision=revision, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise GoldConfigError(
            f"the processor of `{path}` cannot be loaded ({err}): point `processor_config` "
            "(student) or `teacher_tokenizer` (teacher) at a folder with the model's processor."
        ) from err


def _image_token_id(processor):
    for owner in (processor, getattr(processor, "tokenizer", None)):
        value = getattr(owner, "image_token_id", None)
        if value is not None:
            return value
    return None


def check_vision_pair(cfg, teacher_config) -> None:
    """Before any model loads: both models see images, and a pair that shares no
    processor (another family) uses ULD."""
    from transformers import AutoConfig

    student_path = cfg.get("base_model_config") or cfg["base_model"]
    if not is_vision_config(AutoConfig.from_pretrained(student_path)):
        raise GoldConfigError(
            f"`processor_type` is set but `base_model: {cfg['base_model']}` has no vision tower: "
            "use a vision-language student, or remove `processor_type` for a text student."
        )
    if not is_vision_config(teacher_config):
        raise GoldConfigError(
            f"`teacher_model: {cfg['teacher_model']}` is text-only but the student reads "
            "images: use a vision-language teacher (the teacher scores the same image prompts)."
        )
    if cfg.get("use_uld_loss"):
        return
    revision = cfg.get("teacher_model_revision")
    student = _processor(cfg.get("processor_config") or cfg["base_model"], **(cfg.get("processor_kwargs") or {}))
    teacher = _processor(cfg.get("teacher_tokenizer") or cfg["teacher_model"], revision)
    differences = []
    if type(student) is not type(teacher):
        differences.append(f"{type(student).__name__} vs {type(teacher).__name__}")
    if _image_token_id(student) != _image_token_id(teacher):
        differences.append(f"image token {_image_token_id(student)} vs {_image_token_id(teacher)}")
    s_image = getattr(student, "image_processor", None)
    t_image = getattr(teacher, "image_processor", None)
    if s_image is not None and t_image is not None and s_image.to_dict() != t_image.to_dict():
        differences.append("different image preprocessing")
    if differences:
        raise GoldConfigError(
            "the teacher and the student do not share a processor ("
            + "; ".join(differences)
            + "), so one set of image inputs cannot serve both and their token "
            "distributions cannot be compared one to one (a cross-family pair): set "
            "`use_uld_loss: true`."
        )


def student_vision(cfg, tokenizer, settings):
    """The student's processor (Axolotl's loader, from ``cfg``) as a :class:`VisionEncoder`."""
    from axolotl.loaders.processor import load_processor

    from axolotl_gold.vision.batch import VisionEncoder

    processor = load_processor(cfg, tokenizer=tokenizer)
    return VisionEncoder(processor, settings.max_prompt_length)


def teacher_vision(settings):
    """The teacher's processor as a :class:`VisionEncoder` (cross-family ULD)."""
    from axolotl_gold.vision.batch import VisionEncoder

    teacher = settings.teacher
    return VisionEncoder(_processor(teacher.tokenizer, teacher.revision), settings.max_prompt_length)


def dataset_dirs(cfg) -> tuple[str, ...]:
    """Folders of the YAML's local dataset files: relative image paths are read there too."""
    dirs = []
    for section in ("datasets", "test_datasets"):
        for ds in cfg.get(section) or []:
            path = ds.get("path") if hasattr(ds, "get") else None
            if path and os.path.exists(path):
                dirs.append(path if os.path.isdir(path) else os.path.dirname(path))
    return tuple(dict.fromkeys(dirs))


def check_datasets(cfg, settings, train_dataset, eval_dataset=None) -> None:
    """Every row once, before the first step (fails with the row's index)."""
    from axolotl_gold.vision.chat_template import check_rows

    ds_cfg = dict((cfg.get("datasets") or [{}])[0] or {})
    for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None:
            continue
        images = check_rows(dataset, ds_cfg, settings.lmbda, dataset_dirs(cfg))
        LOG.info("GOLD: %s dataset: %d rows, %d images checked", name, len(dataset), images)


def freeze_vision_tower(model) -> int:
    """Freeze the vision tower (``gold_train_vision_tower: true`` keeps it trainable).

    Also freezes LoRA adapters a broad ``lora_target_modules`` put there. Returns
    the number of parameters frozen.
    """
    frozen = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES:
            for param in module.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += param.numel()
    if frozen:
        LOG.info("GOLD: froze %d vision-tower parameters", frozen)
    return frozen
