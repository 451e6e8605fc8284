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


def test_fp16_full_fine_tune_trains_float32_master_weights():
    import torch
    from torch import nn

    from axolotl_gold.models.student import float32_master_weights

    def model():
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).half()
        m[1].requires_grad_(False)  # frozen weights stay as loaded
        return m

    full = model()
    assert float32_master_weights(DictDefault(fp16=True), full) == 2
    assert full[0].weight.dtype == torch.float32 and full[1].weight.dtype == torch.float16
    for cfg in (DictDefault(fp16=True, adapter="lora"), DictDefault(bf16=True),
                DictDefault(fp16=True, deepspeed="zero3.json")):
        untouched = model()
        assert float32_master_weights(cfg, untouched) == 0
        assert untouched[0].weight.dtype == torch.float16
