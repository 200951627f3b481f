"""Relative time bias measured from the query time (the HSTU reference's ts_{i+1} - ts_j)
against a bias written out by hand, and its path through the attention reference."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.ops.hstu_attention import hstu_attention
from megatron_gr.ops.relative_bias import RelativeBiasInputs, dense_relative_bias

# One sequence of 3 events at 0, 10 and 100 s whose query times (the next events; the last
# one's is the held-out target at 1000 s) are 10, 100 and 1000; a second sequence of 1 event.
TIMESTAMPS = torch.tensor([0, 10, 100, 7])
QUERY = torch.tensor([10, 100, 1000, 9])
OFFSETS = torch.tensor([0, 3, 4])
POSITION = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
TIME = torch.arange(40, dtype=torch.float64) / 100  # weight of bucket b: b / 100


def hand_bias() -> torch.Tensor:
    """The first sequence's bias [3, 3] from sqrt buckets of |tq_i - ts_j|:
    i=0 (tq 10): 10 -> 3, 0 -> 0, 90 -> 9; i=1 (tq 100): 100 -> 10, 90 -> 9, 0 -> 0;
    i=2 (tq 1000): 1000 -> 31, 990 -> 31, 900 -> 30."""
    time_buckets = [[3, 0, 9], [10, 9, 0], [31, 31, 30]]
    position = [[0, 1, 2], [1, 0, 1], [2, 1, 0]]
    return torch.tensor([[POSITION[position[i][j]] + TIME[time_buckets[i][j]] for j in range(3)] for i in range(3)])


def test_query_time_bias_by_hand():
    bias = RelativeBiasInputs(POSITION, TIME, TIMESTAMPS, "sqrt", query_timestamps=QUERY)
    got = dense_relative_bias(bias, OFFSETS, 3)
    torch.testing.assert_close(got[0], hand_bias(), rtol=0, atol=1e-15)
    # The one-event sequence: tq 9 - ts 7 = 2 -> bucket 1; padding pairs are never read.
    assert got[1, 0, 0].item() == pytest.approx(POSITION[0].item() + TIME[1].item(), abs=1e-15)


def test_without_query_times_the_bias_is_the_token_gap():
    bias = RelativeBiasInputs(POSITION, TIME, TIMESTAMPS, "sqrt")
    got = dense_relative_bias(bias, OFFSETS, 3)[0]
    # |ts_i - ts_j|: 10 -> 3, 100 -> 10, 90 -> 9
    time_buckets = [[0, 3, 10], [3, 0, 9], [10, 9, 0]]
    assert got[2, 0].item() == pytest.approx(POSITION[2].item() + TIME[time_buckets[2][0]].item(), abs=1e-15)
    assert got[1, 0].item() == pytest.approx(POSITION[1].item() + TIME[time_buckets[1][0]].item(), abs=1e-15)


def test_attention_reference_applies_the_query_time_bias():
    """One head, q.k = 0 (zero keys): each output row is sum_j SiLU(bias_ij) v_j / n over the
    causal prefix, with the hand-written bias above."""
    q = torch.zeros(4, 1, 2, dtype=torch.float64)
    k = torch.zeros(4, 1, 2, dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 3.0]], dtype=torch.float64).unsqueeze(1)
    bias = RelativeBiasInputs(POSITION, TIME, TIMESTAMPS, "sqrt", query_timestamps=QUERY)
    out = hstu_attention(q, k, v, OFFSETS, max_seq_len=5, alpha=1.0, relative_bias=bias)
    silu = torch.nn.functional.silu
    b = hand_bias()
    row2 = sum(silu(b[2, j]) * v[j, 0] for j in range(3)) / 5
    torch.testing.assert_close(out[2, 0], row2)
    torch.testing.assert_close(out[0, 0], silu(b[0, 0]) * v[0, 0] / 5)


def test_query_timestamps_are_checked():
    bias = RelativeBiasInputs(POSITION, TIME, TIMESTAMPS, "sqrt", query_timestamps=QUERY[:3])
    with pytest.raises(ValueError, match="query_timestamps must be int64"):
        bias.validate(4)
