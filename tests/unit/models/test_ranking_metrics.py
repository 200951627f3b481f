"""AUC, GAUC, log loss and MSE against hand-computed values and a brute-force pair count,
with ties, single-class users, NaN scores and empty input; gathering over ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_gr.config.ranking_config import TaskConfig
from megatron_gr.models.ranking.metrics import (
    auc,
    average_ranks,
    gather_rows,
    grouped_auc,
    log_loss,
    mean_squared_error,
    task_metrics,
)


def pairwise_auc(scores, labels) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def test_auc_by_hand_with_and_without_ties():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # Positives 0.5 and 0.9; negatives 0.5 and 0.5: pairs 1/2 + 1/2 + 1 + 1 = 3 of 4.
    assert auc(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == 0.75
    assert auc(np.full(6, 0.3), np.array([0, 1, 0, 1, 1, 0])) == 0.5  # all tied: chance
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0
    assert average_ranks(np.array([2.0, 1.0, 2.0, 5.0])).tolist() == [2.5, 1.0, 2.5, 4.0]


def test_auc_equals_the_pair_count_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 200))
        scores = rng.integers(0, 12, n) / 7.0  # many ties
        labels = rng.integers(0, 2, n)
        if 0 < labels.sum() < n:
            assert auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_auc_refuses_what_has_no_answer():
    assert math.isnan(auc(np.array([0.2, np.nan, 0.9]), np.array([0, 1, 1])))  # never a plausible number
    assert math.isnan(auc(np.array([0.2, np.inf]), np.array([0, 1])))
    assert math.isnan(auc(np.zeros(0), np.zeros(0)))
    assert math.isnan(auc(np.array([0.2, 0.4]), np.array([1, 1])))  # one class


def test_grouped_auc_weights_users_by_candidates_and_skips_single_class_users():
    scores = np.array([0.9, 0.1, 0.5, 0.6, 0.2, 0.3, 0.3, 0.7, 0.8])
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1])
    users = np.array([1, 1, 1, 2, 2, 3, 3, 4, 4])
    # user 1: positive 0.9 above both negatives: 1.0 (3 candidates)
    # user 2: positive 0.6 is the only positive above 0.2? labels (1, 1): single class -> skipped
    # user 3: positive 0.3 ties negative 0.3: 0.5 (2 candidates); user 4: all positive: skipped
    result = grouped_auc(scores, labels, users)
    assert result.value == pytest.approx((1.0 * 3 + 0.5 * 2) / 5)
    assert (result.users, result.skipped) == (2, 2)
    shuffled = np.random.default_rng(1).permutation(scores.size)
    again = grouped_auc(scores[shuffled], labels[shuffled], users[shuffled])
    assert (again.value, again.users, again.skipped) == (result.value, 2, 2)


def test_grouped_auc_equals_per_user_pair_counts_on_random_data():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 6, 400) / 5.0
    labels = rng.integers(0, 2, 400)
    users = rng.integers(0, 40, 400)
    total = weight = 0.0
    for user in np.unique(users):
        mine = users == user
        if 0 < labels[mine].sum() < mine.sum():
            total += pairwise_auc(scores[mine], labels[mine]) * mine.sum()
            weight += mine.sum()
    assert grouped_auc(scores, labels, users).value == pytest.approx(total / weight, abs=1e-12)


def test_grouped_auc_without_any_two_class_user_or_with_nan_is_nan():
    result = grouped_auc(np.array([0.1, 0.2]), np.array([1, 0]), np.array([1, 2]))
    assert math.isnan(result.value) and (result.users, result.skipped) == (0, 2)
    with_nan = grouped_auc(np.array([0.1, np.nan, 0.3]), np.array([1, 0, 1]), np.array([1, 1, 2]))
    assert math.isnan(with_nan.value) and (with_nan.users, with_nan.skipped) == (1, 1)  # counts from the labels
    assert math.isnan(grouped_auc(np.zeros(0), np.zeros(0), np.zeros(0)).value)


def test_log_loss_and_mse_by_hand():
    assert log_loss(np.array([0.8, 0.25]), np.array([1, 0])) == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2)
    assert log_loss(np.array([1.0]), np.array([0])) == pytest.approx(-math.log(1e-7))  # clipped, finite
    assert math.isnan(log_loss(np.array([np.nan]), np.array([1])))
    assert mean_squared_error(np.array([1.0, 4.0]), np.array([2.0, 2.0])) == 2.5
    assert math.isnan(mean_squared_error(np.zeros(0), np.zeros(0)))


def test_task_metrics_name_every_task_and_the_selection():
    tasks = [TaskConfig(name="click", label="a", bitmask=1), TaskConfig(name="watch", type="regression", label="w"),
             TaskConfig(name="like", label="a", bitmask=2)]
    scores = np.array([[0.9, 2.0, 0.1], [0.2, 1.0, 0.7], [0.6, 0.0, 0.4]])
    labels = np.array([[1, 1.0, 0], [0, 2.0, 1], [1, 0.0, 1]])
    oracle = np.array([[0.8, np.nan, 0.3], [0.3, np.nan, 0.6], [0.1, np.nan, 0.5]])
    metrics = task_metrics(tasks, scores, labels, np.array([1, 1, 2]), oracle, "like")
    assert metrics["auc"] == metrics["like/auc"] == 1.0 and metrics["click/auc"] == 1.0
    assert metrics["click/bayes_auc"] == 0.5 and metrics["bayes_auc"] == metrics["like/bayes_auc"] == 1.0
    assert metrics["watch/mse"] == pytest.approx((1 + 1 + 0) / 3) and "watch/auc" not in metrics
    assert metrics["click/gauc_users"] == 1 and metrics["click/gauc_skipped_users"] == 1
    no_oracle = task_metrics(tasks, scores, labels, np.array([1, 1, 2]), np.full((3, 3), np.nan), "click")
    assert "bayes_auc" not in no_oracle and "click/bayes_auc" not in no_oracle


def test_gather_rows_on_one_rank_keeps_the_rows(megatron_cpu):
    rows = torch.arange(6, dtype=torch.float64).view(3, 2)
    assert torch.equal(gather_rows(rows, torch.device("cpu")), rows)
    assert gather_rows(torch.zeros(0, 2), torch.device("cpu")).shape == (0, 2)
