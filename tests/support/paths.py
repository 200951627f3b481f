"""Where the tests find the repository and the ML-100K data set."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def ml100k_dir() -> Path:
    """ML-100K location: $MEGATRON_GR_ML100K, else ../shared/data/ml-100k beside the repo."""
    return Path(os.environ.get("MEGATRON_GR_ML100K", REPO_ROOT.parent / "shared" / "data" / "ml-100k"))
