"""Where events come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_gr.config.ranking_data_config import RankingDataConfig
from megatron_gr.config.validation import check_choice, require
from megatron_gr.data.synthetic import SyntheticSpec
from megatron_gr.data.windows import TRAIN_WINDOWS

DATA_SOURCES = ("auto", "synthetic", "movielens", "prepared", "impressions")


@dataclass
class DataConfig:
    source: Literal["auto", "synthetic", "movielens", "prepared", "impressions"] = "auto"
    """``auto``: told from ``path`` when one is given (a prepared directory -> ``prepared``;
    ``u.data``, ``ratings.dat`` or ``ratings.csv``, or a directory holding one ->
    ``movielens``; anything else is an error), ``synthetic`` when there is no path.
    ``synthetic``: generated in memory from ``data.synthetic`` (retrieval) or
    ``data.ranking.synthetic`` (ranking), no download, no path; ``movielens``: raw
    MovieLens files (u.data, ratings.dat or ratings.csv) under ``path``; ``prepared``: a
    directory written by ``tools/prepare_data.py`` (retrieval); ``impressions``: a
    KuaiRand-style impression CSV file (ranking, see
    ``megatron_gr/data/ranking/impressions.py``; never inferred, name it). The run's first
    line names the source it resolved to."""

    path: Optional[str] = None
    """File or directory of the data for the ``movielens``, ``prepared`` and
    ``impressions`` sources."""

    deduplicate: bool = True
    """Remove events that repeat an earlier (user, item, timestamp) of the same data, keeping
    the first in file order. On by default: a repeated line puts a user's held-out target at
    the end of its own input (leave-one-out), so metrics are inflated, not informative. Set
    false to train on the file exactly as it is; the count is reported either way."""

    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    """Scale and structure of the synthetic generator (used when source is synthetic)."""

    train_windows: Literal["latest", "all"] = "latest"
    """Training examples per user: ``latest``, the most recent ``model.max_seq_len + 1``
    training events (earlier events are never predicted); ``all``, windows of that size cut
    from the end and sharing one event, so every training event but the first is a label
    once (as training on every prefix does; SASRec/RecBole). ``all`` has more examples per
    epoch for users longer than ``max_seq_len + 1`` events."""

    ranking: RankingDataConfig = field(default_factory=RankingDataConfig)
    """How ranking samples are built (``model.type: ranking``)."""

    def __post_init__(self):
        check_choice("source", self.source, DATA_SOURCES)
        check_choice("train_windows", self.train_windows, TRAIN_WINDOWS)
        self._validate_path()

    def _validate_path(self) -> None:
        require(
            self.source in ("auto", "synthetic") or self.path is not None,
            f"source={self.source!r} needs a path: pass --data-path or set data.path",
        )
        # A path next to generated data would be ignored: the run would not train on it.
        require(
            self.source != "synthetic" or self.path is None,
            f"source='synthetic' generates its events and would ignore data.path={self.path!r}: "
            "set data.source to auto, movielens or prepared to train on the path, or drop the path",
        )
