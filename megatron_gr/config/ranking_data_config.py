"""``data.ranking``: how ranking samples are built from each source."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_gr.config.validation import check_int_range, require
from megatron_gr.data.ranking.synthetic import RankingSyntheticSpec


@dataclass
class RankingDataConfig:
    num_candidates: int = 10
    """``movielens``: candidates per sample, the next ratings after the history (the last
    window of each user is test, the one before it valid)."""

    user_column: str = "user_id"
    """``impressions``: the CSV column that identifies the user (GAUC groups, the split)."""

    sequence_delimiter: str = "|"
    """``impressions``: what separates the values of a sequence column."""

    synthetic: RankingSyntheticSpec = field(default_factory=RankingSyntheticSpec)
    """``synthetic``: scale and planted preference model of the generator."""

    def __post_init__(self):
        check_int_range("num_candidates", self.num_candidates, low=1)
        require(self.user_column != "", "user_column is empty: name the CSV column that identifies the user")
        require(
            len(self.sequence_delimiter) == 1 and self.sequence_delimiter not in ",\"\n",
            f"sequence_delimiter={self.sequence_delimiter!r} must be one character other than a comma, "
            "a quote or a newline",
        )
