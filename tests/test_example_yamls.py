"""Every example YAML passes Axolotl's validation with the GOLD schema (no model loads)."""

from pathlib import Path

import pytest
import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_yamls").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path, tmp_path):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(yaml.safe_load(path.read_text()))
    cfg.output_dir = str(tmp_path)
    prepare_plugins(cfg)
    out = validate_config(cfg)
    assert out.teacher_model
    assert out.generation_batch_size * out.num_generations == out.micro_batch_size * out.gradient_accumulation_steps
    expected = "axolotl_gold.vision.chat_template" if out.processor_type else "axolotl_gold.data.chat_template"
    assert all(d["type"] == expected for d in out.datasets)
