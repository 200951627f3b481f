"""HR@K, NDCG@K and MRR from ranks, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gr.models.retrieval_metrics import NAMES, metric_sums, metrics_from_sums


def test_metrics_by_hand():
    ranks = torch.tensor([0, 9, 10, 49, 199, 200])
    m = metrics_from_sums(metric_sums(ranks))
    assert m["hr@10"] == pytest.approx(2 / 6)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(11)) / 6)
    assert m["hr@50"] == pytest.approx(4 / 6)
    assert m["ndcg@50"] == pytest.approx((1 + 1 / math.log2(11) + 1 / math.log2(12) + 1 / math.log2(51)) / 6)
    assert m["hr@200"] == pytest.approx(5 / 6)
    assert m["mrr"] == pytest.approx((1 + 1 / 10 + 1 / 11 + 1 / 50 + 1 / 200 + 1 / 201) / 6)
    assert set(m) == set(NAMES)


def test_sums_add_across_batches():
    a, b = torch.tensor([0, 5]), torch.tensor([300])
    joined = metrics_from_sums(metric_sums(a) + metric_sums(b))
    assert joined == pytest.approx(metrics_from_sums(metric_sums(torch.cat([a, b]))))


def test_empty_evaluation_is_an_error():
    with pytest.raises(ValueError, match="no evaluation examples"):
        metrics_from_sums(metric_sums(torch.tensor([], dtype=torch.int64)))
