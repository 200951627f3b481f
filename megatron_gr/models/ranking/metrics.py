"""Ranking metrics, exact over every data-parallel rank: the scores, labels and users of a
split are gathered, then AUC, per-user GAUC, log loss and MSE are computed on all of them
(in float64, on every rank alike).

- AUC is the Mann-Whitney statistic with tied scores given their average rank, so a tie
  between a positive and a negative counts one half.
- GAUC averages the AUC of each user (group) weighted by the user's number of candidates;
  users whose candidates are all positive or all negative have no AUC and are skipped, and
  the number skipped is reported.
- A NaN or infinite score makes every metric of its task NaN: a broken model never shows a
  plausible number. Empty input, or a single class, gives NaN as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if values.size else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], values.size]
    tie_group = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[tie_group]
    return ranks


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (0/1) ranked by ``scores``."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    if scores.size == 0 or not np.isfinite(scores).all():
        return float("nan")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


@dataclass(frozen=True)
class GroupedAUC:
    value: float
    """Candidate-weighted mean of the per-user AUCs (NaN when no user has both classes)."""
    users: int
    """Users with both classes (those averaged)."""
    skipped: int
    """Users whose candidates are all positive or all negative (from the labels alone: a NaN
    score makes ``value`` NaN, not these counts)."""


def grouped_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> GroupedAUC:
    """Per-group AUC (ties by average rank within the group), weighted by group size."""
    scores, labels, groups = np.asarray(scores, np.float64), np.asarray(labels) > 0.5, np.asarray(groups)
    if scores.size == 0:
        return GroupedAUC(float("nan"), 0, 0)
    order = np.lexsort((scores, groups))
    s, y, g = scores[order], labels[order], groups[order]
    group_start = np.r_[True, g[1:] != g[:-1]]
    num_groups = int(group_start.sum())
    # Ties: runs of equal (group, score); ranks count from each group's start.
    tie_start = group_start | np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(tie_start)
    ends = np.r_[starts[1:], s.size]
    group_of = np.cumsum(group_start) - 1
    first_of_group = np.flatnonzero(group_start)
    tie_group = np.repeat(np.arange(starts.size), ends - starts)
    mean_position = (starts + 1 + ends) / 2.0  # 1-based, over the whole array
    ranks = mean_position[tie_group] - first_of_group[group_of]
    size = np.bincount(group_of, minlength=num_groups)
    positives = np.bincount(group_of, weights=y, minlength=num_groups)
    negatives = size - positives
    rank_sum = np.bincount(group_of, weights=ranks * y, minlength=num_groups)
    both = (positives > 0) & (negatives > 0)
    if not both.any() or not np.isfinite(scores).all():  # a non-finite score: NaN, never a plausible value
        return GroupedAUC(float("nan"), int(both.sum()), int(num_groups - both.sum()))
    per_group = (rank_sum[both] - positives[both] * (positives[both] + 1) / 2.0) / (positives[both] * negatives[both])
    value = float((per_group * size[both]).sum() / size[both].sum())
    return GroupedAUC(value, int(both.sum()), int(num_groups - both.sum()))


def log_loss(probabilities: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of predicted probabilities (clipped to [eps, 1 - eps])."""
    p = np.asarray(probabilities, np.float64)
    if p.size == 0 or not np.isfinite(p).all():
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)).mean())


def mean_squared_error(predictions: np.ndarray, values: np.ndarray) -> float:
    predictions = np.asarray(predictions, np.float64)
    if predictions.size == 0 or not np.isfinite(predictions).all():
        return float("nan")
    return float(((predictions - np.asarray(values, np.float64)) ** 2).mean())


def task_metrics(tasks, scores: np.ndarray, labels: np.ndarray, users: np.ndarray, oracle, selection: str) -> dict:
    """Every task's metrics (``<task>/auc``, ``/gauc``, ``/gauc_users``,
    ``/gauc_skipped_users``, ``/logloss``; ``/mse`` for regressions; ``/bayes_auc`` where the
    data knows the planted probabilities), plus ``auc``, ``gauc`` and ``bayes_auc`` of the
    selection task."""
    metrics: dict[str, float] = {}
    for t, task in enumerate(tasks):
        name = task.name
        if task.type == "regression":
            metrics[f"{name}/mse"] = mean_squared_error(scores[:, t], labels[:, t])
            continue
        grouped = grouped_auc(scores[:, t], labels[:, t], users)
        metrics[f"{name}/auc"] = auc(scores[:, t], labels[:, t])
        metrics[f"{name}/gauc"] = grouped.value
        metrics[f"{name}/gauc_users"] = float(grouped.users)
        metrics[f"{name}/gauc_skipped_users"] = float(grouped.skipped)
        metrics[f"{name}/logloss"] = log_loss(scores[:, t], labels[:, t])
        if oracle is not None and np.isfinite(oracle[:, t]).all() and oracle.shape[0] > 0:
            metrics[f"{name}/bayes_auc"] = auc(oracle[:, t], labels[:, t])
    headline = {"auc": metrics[f"{selection}/auc"], "gauc": metrics[f"{selection}/gauc"]}
    if f"{selection}/bayes_auc" in metrics:
        headline["bayes_auc"] = metrics[f"{selection}/bayes_auc"]
    return {**headline, **metrics}


def gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``[n_r, K]`` rows (n_r may differ, and be 0), concatenated in rank order
    on every rank (collective over the default group)."""
    local = local.to(device)
    world = dist.get_world_size()
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[dist.get_rank()] = local.shape[0]
    dist.all_reduce(counts)
    longest = int(counts.max())
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[: int(n)] for piece, n in zip(pieces, counts.tolist())])
