"""The Axolotl plugin: ``plugins: [axolotl_gold.GoldPlugin]``.

Inert unless ``teacher_model`` is set, and cheap to import: the trainer, the
teacher and the losses load inside the hooks that need them.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from axolotl_gold.config.validation import honour_batch_size, route_chat_datasets


def gold_enabled(cfg) -> bool:
    return bool(cfg.get("teacher_model"))


class GoldPlugin(BasePlugin):
    """On-policy logit distillation from ``teacher_model`` (see the README)."""

    def register(self, cfg) -> None:
        if gold_enabled(cfg):
            route_chat_datasets(cfg)
            honour_batch_size(cfg)
            # the earliest hook: Axolotl patches modeling code before `pre_model_load`
            from axolotl_gold.models.teacher import record_teacher_modeling

            record_teacher_modeling(cfg)

    def load_datasets(self, cfg, preprocess: bool = False):
        if gold_enabled(cfg):
            from axolotl_gold.models.student import place_cpu_processes_on_cpu

            place_cpu_processes_on_cpu(cfg)
        return None  # Axolotl's own dataset loading does the work

    def get_input_args(self) -> str:
        return "axolotl_gold.config.schema.GoldArgs"

    def pre_model_load(self, cfg) -> None:
        if gold_enabled(cfg):
            from axolotl_gold.models.compatibility import check_teacher_compatible

            check_teacher_compatible(cfg)
            # each teacher server reachable, and serving its teacher's sizes
            if cfg.get("teacher_server_url") or cfg.get("teacher_servers"):
                from axolotl_gold.config.settings import GoldSettings
                from axolotl_gold.models.remote.router import check_teacher_servers

                check_teacher_servers(GoldSettings.from_cfg(cfg))

    def post_model_load(self, cfg, model) -> None:
        if gold_enabled(cfg):
            from axolotl_gold.models.student import float32_master_weights

            float32_master_weights(cfg, model)

    def get_trainer_cls(self, cfg):
        if not gold_enabled(cfg):
            return None
        from axolotl_gold.trainer.gold_trainer import GoldTrainer

        return GoldTrainer

    def post_trainer_create(self, cfg, trainer) -> None:
        if gold_enabled(cfg):
            from axolotl_gold.assembly import assemble

            trainer.setup_gold(assemble(cfg, trainer))
