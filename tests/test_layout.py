"""The package reads as its architecture: concept folders whose imports run one way.

config -> data -> vision / crosstok / rollouts / scoring (losses beside them) -> models
-> trainer -> assembly -> plugin. Every ``axolotl_gold`` import of every module, at the
top or inside a function, must point at its own folder or one listed below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "axolotl_gold"

# folder (or top-level module) -> the folders it may import from, besides itself
ALLOWED = {
    "config": set(),
    "losses": set(),
    "data": {"config"},
    "vision": {"config", "data"},
    "crosstok": {"config", "data"},
    "rollouts": {"config", "data"},
    "scoring": {"config", "data", "losses"},
    "models": {"config", "data", "vision", "scoring"},
    "trainer": {"config", "data", "vision", "crosstok", "rollouts", "scoring", "losses", "models"},
    "assembly": {"config", "data", "vision", "crosstok", "rollouts", "scoring", "losses", "models", "trainer"},
    "plugin": {"config", "models", "assembly", "trainer"},
    "demo": {"config", "data"},
    "__init__": {"plugin"},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "axolotl_gold" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
                break
    return out


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_rule():
    assert {_unit(p) for p in _modules()} <= set(ALLOWED)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    unit = _unit(path)
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line} imports axolotl_gold.{target}"
        for line, target in _imports(path)
        if target != unit and target not in ALLOWED[unit] and target in ALLOWED
    ]
    assert not wrong, "imports against the layering: " + "; ".join(wrong)


def test_no_folder_in_disguise():
    """Top level holds only the folders, the assembly and the plugin."""
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "assembly.py", "plugin.py"}
