"""Ranking data: sources (a synthetic generator with a planted preference model, MovieLens
windows, KuaiRand-style impression CSVs) -> :class:`RankingSamples` -> indexed columns ->
jagged :class:`RankingBatch` micro-batches."""

from megatron_gr.data.ranking.samples import SPLITS, TEST, TRAIN, VALID, RankingSamples, split_by_time, window_samples
from megatron_gr.data.ranking.synthetic import RankingSyntheticSpec, generate_ranking

__all__ = [
    "SPLITS",
    "TEST",
    "TRAIN",
    "VALID",
    "RankingSamples",
    "RankingSyntheticSpec",
    "generate_ranking",
    "split_by_time",
    "window_samples",
]
