"""Raw int64 ids for categorical values read as text (a gender, an occupation, a zip code)."""

from __future__ import annotations

import hashlib

import numpy as np

_INT64_MAX = (1 << 63) - 1


def raw_id(text: str) -> int:
    """The value itself when it is a decimal integer that fits int64 (ids stay readable),
    else a stable 63-bit hash of the text (the same on every machine and run)."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        value = int(stripped)
        if -_INT64_MAX <= value <= _INT64_MAX:
            return value
    digest = hashlib.blake2b(stripped.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def raw_ids(texts) -> np.ndarray:
    return np.fromiter((raw_id(text) for text in texts), dtype=np.int64)
