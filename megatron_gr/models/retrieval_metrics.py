"""Retrieval metrics from 0-based full-corpus ranks (rank 0 = the target scored highest).

HR@K = 1[rank < K]; NDCG@K = 1[rank < K] / log2(rank + 2) (one relevant item); MRR = 1 / (rank + 1).
"""

from __future__ import annotations

import torch

KS = (10, 50, 200)
NAMES = tuple(f"{m}@{k}" for k in KS for m in ("hr", "ndcg")) + ("mrr",)


def metric_sums(ranks: torch.Tensor) -> torch.Tensor:
    """``[1 + len(NAMES)]`` float64 sums over the batch: count first, then NAMES in order."""
    ranks = ranks.to(torch.float64)
    values = [torch.tensor(float(ranks.numel()), dtype=torch.float64, device=ranks.device)]
    for k in KS:
        hit = (ranks < k).to(torch.float64)
        values.append(hit.sum())
        values.append((hit / torch.log2(ranks + 2.0)).sum())
    values.append((1.0 / (ranks + 1.0)).sum())
    return torch.stack(values)


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    count = float(sums[0])
    if count == 0:
        raise ValueError("no evaluation examples")
    return {name: float(value) / count for name, value in zip(NAMES, sums[1:].tolist())}
