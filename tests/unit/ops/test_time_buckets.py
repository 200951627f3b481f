"""Time-gap bucketing against values computed by hand and, for ``hstu_log``, against exact
decimal arithmetic at every bucket boundary a realistic gap can reach."""

from __future__ import annotations

from decimal import Decimal, getcontext

import pytest
import torch

from megatron_gr.ops.time_buckets import bucketize_time_gaps

GAPS = [0, 1, 2, 3, 4, 10, 86400, -5]


@pytest.mark.parametrize(
    "fn, expected",
    [
        ("sqrt", [0, 1, 1, 1, 2, 3, 293, 2]),  # floor(sqrt(|g|)): sqrt(86400) = 293.9
        ("log", [0, 1, 1, 2, 2, 3, 16, 2]),  # floor(log2(|g| + 1)): log2(86401) = 16.4
        # floor(ln(max(|g|, 1)) / 0.301): ln 2 / 0.301 = 2.30, ln 3 / 0.301 = 3.65, ln 4 / 0.301 = 4.61,
        # ln 10 / 0.301 = 7.65, ln 86400 / 0.301 = 37.76, ln 5 / 0.301 = 5.35
        ("hstu_log", [0, 0, 2, 3, 4, 7, 37, 5]),
    ],
)
def test_buckets_by_hand(fn, expected):
    assert bucketize_time_gaps(torch.tensor(GAPS), 1000, fn).tolist() == expected


def test_last_bucket_collects_long_gaps():
    assert bucketize_time_gaps(torch.tensor(GAPS), 6, "hstu_log").tolist() == [0, 0, 2, 3, 4, 5, 5, 5]


def test_hstu_log_is_exact_at_bucket_boundaries():
    """For every bucket b up to 79 (gaps up to ~2e10 s, 670 years) the integers around
    e^(0.301 b) get floor(ln(g) / 0.301) computed with 60 exact digits."""
    getcontext().prec = 60
    step = Decimal("0.301")
    gaps = set()
    for b in range(1, 80):
        edge = int((step * b).exp().to_integral_value(rounding="ROUND_CEILING"))
        gaps |= {g for g in (edge - 1, edge, edge + 1) if g >= 1}
    gaps = sorted(gaps)
    exact = [int((Decimal(g).ln() / step).to_integral_value(rounding="ROUND_FLOOR")) for g in gaps]
    assert bucketize_time_gaps(torch.tensor(gaps), 1000, "hstu_log").tolist() == exact


def test_unknown_function_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        bucketize_time_gaps(torch.tensor([1]), 4, "cube")
