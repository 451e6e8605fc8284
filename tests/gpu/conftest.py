"""The GPU suite's session: build the models, run every selected case at once, write the table.

All cases run in one fixture (concurrent `axolotl train` subprocesses on the one GPU);
each test then only reads its case's result. The table goes to ``$OUT/gpu_suite.md`` and
``.json`` (else the session's temporary folder) before any test asserts, and is printed
at the end of the session.
"""

import os
from pathlib import Path

import pytest

from gpu_cases import on_cpu, selected

_REPORT = {}


@pytest.fixture(scope="session")
def gpu_suite(tmp_path_factory):
    from gpu_harness import run_all, write_report
    from gpu_models import Assets

    root = tmp_path_factory.mktemp("gpu_suite")
    results = run_all(selected(), Assets(root / "models", cpu=on_cpu()), root / "runs")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else root
    _REPORT["text"] = write_report(results, out_dir, root / "runs")
    _REPORT["where"] = out_dir / "gpu_suite.md"
    return results


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.write_sep("=", f"GOLD GPU suite ({_REPORT['where']})")
        terminalreporter.write(_REPORT["text"])
