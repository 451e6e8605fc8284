"""The plugin is registered, cheap to import and inert unless `teacher_model` is set."""

import subprocess
import sys
from importlib.metadata import entry_points

from axolotl.utils.dict import DictDefault


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="axolotl.plugins") if ep.value.startswith("axolotl_gold")]
    assert eps and eps[0].load().__name__ == "GoldPlugin"


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, axolotl_gold; print(sorted(m for m in ('torch', 'transformers', 'axolotl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_inert_without_teacher():
    from axolotl_gold.plugin import GoldPlugin

    plugin = GoldPlugin()
    cfg = DictDefault(base_model="x", datasets=[{"path": "d", "type": "chat_template"}])
    plugin.register(cfg)
    assert cfg.datasets[0]["type"] == "chat_template"  # not routed
    assert plugin.get_trainer_cls(cfg) is None
    assert plugin.load_datasets(cfg) is None
    plugin.post_trainer_create(cfg, trainer=None)  # returns before touching the trainer
