"""Config keys that were renamed, still read for one release with a one-line notice.

The kernel choice used to be three keys (``model.attention_kernel``, ``model.use_fused_mhc``,
``embeddings.<table>.dynamic.kernel``); it is one now, ``training.kernel_backend``. Each old
key is translated into the new one before the config is built; old keys that ask for
different backends, or that contradict the new key, are an error.
"""

from __future__ import annotations

import sys
from typing import Any

from megatron_gr.config.errors import ConfigError

NEW_KEY = "training.kernel_backend"


def _backend_of(key: str, value: Any) -> str:
    if key == "model.use_fused_mhc":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return "triton" if value else "pytorch"
    allowed = ("auto", "pytorch", "triton") if key.endswith("dynamic.kernel") else ("pytorch", "triton")
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))} (or use {NEW_KEY})")
    return value


def _pop_old_keys(raw: dict) -> dict[str, Any]:
    """Removes every old kernel key from ``raw`` (in place): {dotted key: value}."""
    found = {}
    model = raw.get("model")
    if isinstance(model, dict):
        for name in ("attention_kernel", "use_fused_mhc"):
            if name in model:
                found[f"model.{name}"] = model.pop(name)
    embeddings = raw.get("embeddings")
    if isinstance(embeddings, dict):
        for table, settings in embeddings.items():
            dynamic = settings.get("dynamic") if isinstance(settings, dict) else None
            if isinstance(dynamic, dict) and "kernel" in dynamic:
                found[f"embeddings.{table}.dynamic.kernel"] = dynamic.pop("kernel")
    return found


def apply_deprecations(raw: dict) -> dict:
    """``raw`` with old kernel keys translated to ``training.kernel_backend``; prints one
    notice line per old key."""
    raw = {name: (dict(section) if isinstance(section, dict) else section) for name, section in raw.items()}
    if isinstance(raw.get("embeddings"), dict):
        raw["embeddings"] = {
            name: ({**table, "dynamic": dict(table["dynamic"])} if isinstance(table, dict) and isinstance(table.get("dynamic"), dict) else table)
            for name, table in raw["embeddings"].items()
        }
    old = _pop_old_keys(raw)
    if not old:
        return raw
    requested = {key: _backend_of(key, value) for key, value in old.items()}
    for key, value in old.items():
        print(f"notice: {key} is deprecated and will be removed; use {NEW_KEY} (--kernel-backend) instead", file=sys.stderr)
    choices = set(requested.values())
    if len(choices) > 1:
        listing = ", ".join(f"{key}={value!r}" for key, value in old.items())
        raise ConfigError(f"{listing} ask for different kernel backends; there is one setting now: set {NEW_KEY} instead")
    (backend,) = choices
    training = raw.get("training")
    if training is None:
        training = raw["training"] = {}
    if not isinstance(training, dict):
        return raw  # the section's own type error is reported when it is built
    if "kernel_backend" in training and training["kernel_backend"] != backend:
        key = next(iter(old))
        raise ConfigError(f"{key}={old[key]!r} contradicts {NEW_KEY}={training['kernel_backend']!r}: drop the old key")
    training["kernel_backend"] = backend
    return raw
