"""Every project name a tool imports exists: the benchmarks import lazily (inside the functions
that need a GPU), so a moved module would otherwise surface only on the device."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = sorted((ROOT / "tools").rglob("*.py"))


def _project_imports(path: Path) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "megatron_gr":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "megatron_gr"]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_project_import_of_a_tool_resolves(path):
    missing = []
    for module, name in _project_imports(path):
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(module)
            continue
        if name and name != "*" and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{path.name} imports what the package does not have: {missing}"
