"""Retrieval metrics from 0-based full-corpus ranks (rank 0 = the target scored highest).

HR@K = 1[rank < K]; NDCG@K = 1[rank < K] / log2(rank + 2) (one relevant item); MRR = 1 / (rank + 1).
Ranks are pessimistic (``models.retrieval_head.full_corpus_ranks``: ties count against the
target, NaN scores rank last), so every metric is a lower bound that no degenerate model
inflates. No metric is ever made up: an empty evaluation or a non-finite sum is an error.
"""

from __future__ import annotations

import math

import torch

KS = (10, 50, 200)
NAMES = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg")) + ("mrr",)


def metric_sums(ranks: torch.Tensor) -> torch.Tensor:
    """``[1 + len(NAMES)]`` float64 sums over the batch: count first, then NAMES in order.

    Raises:
        ValueError: ranks that are not non-negative integers.
    """
    if ranks.is_floating_point() or ranks.is_complex() or ranks.dtype == torch.bool:
        raise ValueError(f"ranks must be an integer tensor, got {ranks.dtype}")
    if ranks.numel() and int(ranks.min()) < 0:
        raise ValueError(f"ranks must be >= 0, got {int(ranks.min())}")
    ranks = ranks.to(torch.float64)
    values = [torch.tensor(float(ranks.numel()), dtype=torch.float64, device=ranks.device)]
    for k in KS:
        hit = (ranks < k).to(torch.float64)
        values.append(hit.sum())
        values.append((hit / torch.log2(ranks + 2.0)).sum())
    values.append((1.0 / (ranks + 1.0)).sum())
    return torch.stack(values)


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Means of the summed metrics (sums of any number of :func:`metric_sums`).

    Raises:
        ValueError: no examples (count 0), or a sum that is NaN or infinite.
    """
    values = sums.tolist()
    if len(values) != 1 + len(NAMES):
        raise ValueError(f"expected {1 + len(NAMES)} sums (count, {', '.join(NAMES)}), got {len(values)}")
    count, totals = values[0], values[1:]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite metric sums {values}: a rank was not a finite number")
    if count == 0:
        raise ValueError("no evaluation examples")
    return {name: value / count for name, value in zip(NAMES, totals)}
