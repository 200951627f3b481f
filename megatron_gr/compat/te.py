"""Whether Transformer Engine, megatron-core's optional backend, is installed."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
