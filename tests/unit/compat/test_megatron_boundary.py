"""Only ``megatron_gr/compat`` touches megatron-core's internals: no other module of the
package imports a private megatron name, reads a private attribute (one megatron_gr does not
define; torch's own private API aside) of an object it did not define, assigns into a megatron module, names megatron's RNG tracker global, or drives
the halves of megatron's optimizer step."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "megatron_gr"
COMPAT = PACKAGE / "compat"
# Halves of megatron's optimizer step and the parts of a chained optimizer: compat.optimizer_step.
OPTIMIZER_INTERNALS = {"prepare_grads", "step_with_ready_grads", "chained_optimizers", "is_stub_optimizer"}


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if COMPAT not in path.parents)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_private_names() -> set[str]:
    """Private names the package itself defines (methods, attributes, module globals)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {name for name in names if _private(name)}


def _megatron_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to megatron modules or objects by imports."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
            aliases |= {a.asname or a.name for a in node.names}
    return aliases


def _torch_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to torch modules by imports (torch's private API, e.g.
    ``torch._scaled_mm``, is torch's business, not megatron's)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "torch"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            aliases |= {a.asname or a.name for a in node.names}
    return aliases


def _root(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def violations(source: str, name: str, *, own: set[str]) -> list[str]:
    """What in ``source`` (the module ``name``) reaches into megatron; ``own``: the private
    names megatron_gr defines (read on any of its objects)."""
    tree = ast.parse(source)
    megatron = _megatron_aliases(tree)
    torch_names = _torch_aliases(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
            if any(_private(part) for part in node.module.split(".")) or any(_private(a.name) for a in node.names):
                found.append(f"{where}: imports a private megatron name")
        elif isinstance(node, ast.Attribute):
            base = node.value
            on_self = isinstance(base, ast.Name) and base.id in ("self", "cls")
            on_super = isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super"
            foreign = node.attr not in own and _root(base) not in torch_names
            if _private(node.attr) and not (on_self or on_super) and foreign:
                found.append(f"{where}: reads private attribute {node.attr} of another object")
            elif _private(node.attr) and node.attr not in own and _root(base) not in torch_names:
                found.append(f"{where}: uses {node.attr}, which megatron_gr does not define (inherited from megatron?)")
            if node.attr in OPTIMIZER_INTERNALS:
                found.append(f"{where}: drives megatron's optimizer step by hand ({node.attr})")
            if isinstance(node.ctx, ast.Store) and isinstance(base, ast.Name) and base.id in megatron:
                found.append(f"{where}: assigns {base.id}.{node.attr} (a megatron module or object)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            target = node.args[0] if node.args else None
            if isinstance(target, ast.Name) and target.id in megatron:
                found.append(f"{where}: setattr on {target.id} (a megatron module or object)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "_CUDA_RNG_STATE_TRACKER" in node.value:
            found.append(f"{where}: names megatron's RNG tracker global")
        elif isinstance(node, ast.Name) and "_CUDA_RNG_STATE_TRACKER" in node.id:
            found.append(f"{where}: names megatron's RNG tracker global")
    return found


def test_no_module_outside_compat_reaches_into_megatron():
    own = _own_private_names()
    found = [
        problem
        for path in _modules()
        for problem in violations(path.read_text(), str(path.relative_to(PACKAGE.parent)), own=own)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source, words",
    [
        ("from megatron.core.tensor_parallel.random import _set_cuda_rng_state\n", "private megatron name"),
        ("def f(checkpoint):\n    checkpoint._recompute(None)\n", "private attribute _recompute"),
        ("class B:\n    def f(self):\n        return self._checkpointed_forward()\n", "does not define"),
        ("from megatron.core.tensor_parallel import random\nrandom.initialize_rng_tracker = print\n", "assigns random"),
        ("import megatron.core\nsetattr(megatron, 'x', 1)\n", "setattr on megatron"),
        ("def f(o):\n    return o.prepare_grads()\n", "optimizer step by hand"),
        ("x = '_CUDA_RNG_STATE_TRACKER'\n", "RNG tracker global"),
    ],
)
def test_the_check_finds_each_kind_of_reach(source, words):
    found = violations(source, "probe.py", own=set())
    assert any(words in problem for problem in found), found
