"""Where events come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_gr.config.validation import check_choice, require
from megatron_gr.data.synthetic import SyntheticSpec
from megatron_gr.data.windows import TRAIN_WINDOWS

DATA_SOURCES = ("synthetic", "movielens", "prepared")


@dataclass
class DataConfig:
    source: Literal["synthetic", "movielens", "prepared"] = "synthetic"
    """``synthetic``: generated in memory from ``data.synthetic`` (no download);
    ``movielens``: raw MovieLens files (u.data, ratings.dat or ratings.csv) under ``path``;
    ``prepared``: a directory written by ``tools/prepare_data.py``."""

    path: Optional[str] = None
    """File or directory of the data for ``movielens`` and ``prepared`` sources."""

    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    """Scale and structure of the synthetic generator (used when source is synthetic)."""

    train_windows: Literal["latest", "all"] = "latest"
    """Training examples per user: ``latest``, the most recent ``model.max_seq_len + 1``
    training events (earlier events are never predicted); ``all``, windows of that size cut
    from the end and sharing one event, so every training event but the first is a label
    once (as training on every prefix does; SASRec/RecBole). ``all`` has more examples per
    epoch for users longer than ``max_seq_len + 1`` events."""

    def __post_init__(self):
        check_choice("source", self.source, DATA_SOURCES)
        check_choice("train_windows", self.train_windows, TRAIN_WINDOWS)
        require(
            self.source == "synthetic" or self.path is not None,
            f"source={self.source!r} needs a path: pass --data-path or set data.path",
        )
