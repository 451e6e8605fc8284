"""What a GOLD trainer is handed: built by ``axolotl_gold.assembly``."""

from __future__ import annotations

from dataclasses import dataclass

from axolotl_gold.config.settings import GoldSettings
from axolotl_gold.rollouts.engines.base import RolloutEngine


@dataclass
class GoldParts:
    """Everything a GOLD trainer runs with."""

    settings: GoldSettings
    teacher: object
    objective: object
    collator: object
    student_engine: RolloutEngine
    teacher_engine: RolloutEngine | None
    tokenizer: object  # the student's tokenizer or processor (decodes the completions log)
    pad_id: int
    stop_ids: set[int]
    vision: object | None = None  # a VisionEncoder: rows with images
    sharding: object = None  # models.sharding: whole, ZeRO-3 or FSDP2
