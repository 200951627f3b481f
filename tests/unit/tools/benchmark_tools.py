"""The scripts under tools/benchmarks/ as modules, for their tests (they are scripts, not a
package: each is loaded from its file, once per test session)."""

from __future__ import annotations

import importlib.util
import sys
import types

from tests.conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "tools" / "benchmarks"


def load_benchmark(name: str) -> types.ModuleType:
    """``tools/benchmarks/<name>.py``, registered under ``name`` (its dataclasses look their
    module up) with its folder on the path (its sibling helpers import as they do when it
    runs as a script)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
