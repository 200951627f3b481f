"""Micro-batches: cost-balanced partition of a global batch, the same on every
data-parallel size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gr.data import LeaveOneOutSplit, UserSequences, generate
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.loader import PARTITIONS, TrainingBatches, attention_cost_partition, contiguous_partition
from megatron_gr.data.synthetic import SyntheticSpec


def skewed(n: int, seed: int) -> np.ndarray:
    """Mostly short sequences and a few long ones, as in recommendation logs."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.1, rng.integers(150, 200, n), rng.integers(2, 20, n))


@pytest.mark.parametrize("n, parts", [(64, 4), (96, 8), (10, 3), (5, 5)])
def test_attention_cost_partition_is_a_balanced_equal_size_partition(n, parts):
    users = np.random.default_rng(n).permutation(1000)[:n]
    tokens = skewed(n, seed=parts)
    groups = attention_cost_partition(users, tokens, parts)
    assert len(groups) == parts
    assert sorted(np.concatenate(groups).tolist()) == sorted(users.tolist())  # everyone once
    assert [g.size for g in groups] == [g.size for g in np.array_split(users, parts)]  # equal sizes
    position = {u: i for i, u in enumerate(users.tolist())}
    for g in groups:  # stream order inside a micro-batch
        assert [position[u] for u in g.tolist()] == sorted(position[u] for u in g.tolist())
    cost = dict(zip(users.tolist(), (tokens.astype(float) ** 2).tolist()))
    loads = [sum(cost[u] for u in g.tolist()) for g in groups]
    # Greedy LPT guarantee: no micro-batch exceeds the mean by more than one sequence.
    assert max(loads) <= sum(loads) / parts + max(cost.values()) + 1e-9
    again = attention_cost_partition(users, tokens, parts)
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))  # deterministic


def test_balancing_beats_cutting_the_stream_on_skewed_lengths():
    users, tokens = np.arange(256), skewed(256, seed=0)
    cost = tokens.astype(float) ** 2

    def spread(groups):
        loads = [cost[g].sum() for g in groups]
        return max(loads) / (sum(loads) / len(loads))

    assert spread(attention_cost_partition(users, tokens, 8)) < 1.1  # seen: 1.08
    assert spread(contiguous_partition(users, tokens, 8)) > 1.5  # seen: 1.99


@pytest.fixture(scope="module")
def split():
    spec = SyntheticSpec(num_users=120, num_items=50, mean_length=20.0, max_length=80, seed=5)
    return LeaveOneOutSplit.build(UserSequences.from_events(generate(spec)))


@pytest.mark.parametrize("balance", list(PARTITIONS))
def test_micro_batches_do_not_depend_on_the_data_parallel_size(split, balance):
    """Rank r of 2 (2 micro-batches each) gets micro-batches 2r and 2r + 1 of one rank with
    4: same users, tokens, labels, negatives, dropout keys and seeds, over several steps."""
    def loader(dp_rank, dp_size, num_micro_batches):
        items = ItemSpace(vocab=split.sequences.item_vocab, raw_keys=False)
        return TrainingBatches(split, items, max_seq_len=30, micro_batch_size=6, num_micro_batches=num_micro_batches,
                               seed=9, dp_rank=dp_rank, dp_size=dp_size, partition_fn=PARTITIONS[balance],
                               num_negatives=5, num_in_batch_negatives=3)

    single, ranks = loader(0, 1, 4), [loader(r, 2, 2) for r in range(2)]
    for _ in range(3):
        expected = single.next_step()
        got = [b for rank in ranks for b in rank.next_step()]
        assert len(got) == len(expected) == 4
        for a, b in zip(got, expected):
            assert a.dropout_seed == b.dropout_seed
            for name in ("user_ids", "item_ids", "offsets", "labels", "timestamps", "negative_ids", "token_keys"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert ranks[0].consumed_samples == single.consumed_samples == 3 * 24
