"""Where events come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_gr.config.ranking_data_config import RankingDataConfig
from megatron_gr.config.validation import check_choice, require
from megatron_gr.data.synthetic import SyntheticSpec

DATA_SOURCES = ("synthetic", "movielens", "prepared", "impressions")


@dataclass
class DataConfig:
    source: Literal["synthetic", "movielens", "prepared", "impressions"] = "synthetic"
    """``synthetic``: generated in memory from ``data.synthetic`` (retrieval) or
    ``data.ranking.synthetic`` (ranking), no download; ``movielens``: raw MovieLens files
    (u.data, ratings.dat or ratings.csv) under ``path``; ``prepared``: a directory written by
    ``tools/prepare_data.py`` (retrieval); ``impressions``: a KuaiRand-style impression CSV
    file (ranking, see ``megatron_gr/data/ranking/impressions.py``)."""

    path: Optional[str] = None
    """File or directory of the data for the ``movielens``, ``prepared`` and
    ``impressions`` sources."""

    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    """Scale and structure of the synthetic generator (used when source is synthetic)."""

    ranking: RankingDataConfig = field(default_factory=RankingDataConfig)
    """How ranking samples are built (``model.type: ranking``)."""

    def __post_init__(self):
        check_choice("source", self.source, DATA_SOURCES)
        require(
            self.source == "synthetic" or self.path is not None,
            f"source={self.source!r} needs a path: pass --data-path or set data.path",
        )
