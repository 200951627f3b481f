"""The context-parallel split of a jagged micro-batch: chunks and which rank holds them, the
placement of whole sequences by attention cost, positions, the keys each segment gets
through the simulated all-gather, and the tokens that end a sequence."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_gr.transformer.context_parallel import plan_context_split


def plans(lengths, size, threshold, **mask):
    return [plan_context_split(lengths, size=size, rank=r, split_threshold=threshold, **mask) for r in range(size)]


def test_docstring_example():
    """One sequence of 8 split into 4 chunks (rank 0: chunks 0 and 3), three short ones placed
    by cost: 3 tokens to rank 0 (cost 9), then 2 to rank 1 (4), then 2 to rank 1 (4 < 9)."""
    r0, r1 = plans([8, 3, 2, 2], 2, 4)
    # sequence 0: tokens 0-7; sequence 1: 8-10; sequence 2: 11-12; sequence 3: 13-14
    assert r0.token_index.tolist() == [0, 1, 6, 7, 8, 9, 10]
    assert r1.token_index.tolist() == [2, 3, 4, 5, 11, 12, 13, 14]
    assert r0.segment_sequence.tolist() == [0, 0, 1] and r1.segment_sequence.tolist() == [0, 0, 2, 3]
    assert r0.segment_start.tolist() == [0, 6, 0] and r1.segment_start.tolist() == [2, 4, 0, 0]
    assert r0.segment_length.tolist() == [2, 2, 3] and r1.segment_length.tolist() == [2, 2, 2, 2]
    assert r0.sequence_length.tolist() == [8, 8, 3]
    # Causal: a chunk needs the keys up to its own end; a whole sequence its own tokens.
    assert r0.key_length.tolist() == [2, 8, 3] and r1.key_length.tolist() == [4, 6, 2, 2]
    # The sequences' last tokens: the last chunk of a split sequence lives on rank 0.
    assert r0.last_sequence.tolist() == [0, 1] and r0.last_token.tolist() == [3, 6]
    assert r1.last_sequence.tolist() == [2, 3] and r1.last_token.tolist() == [5, 7]


@pytest.mark.parametrize("size", [2, 3, 4])
def test_split_sequences_cut_into_two_chunks_per_rank(size):
    length = 10 * size + 3  # chunks of unequal length
    per_rank = plans([length], size, 2 * size)
    bounds = (np.arange(2 * size + 1) * length) // (2 * size)
    for rank, plan in enumerate(per_rank):
        chunks = [rank, 2 * size - 1 - rank]
        assert plan.segment_start.tolist() == [bounds[c] for c in chunks]
        assert plan.segment_length.tolist() == [bounds[c + 1] - bounds[c] for c in chunks]
        want = np.concatenate([np.arange(bounds[c], bounds[c + 1]) for c in chunks])
        assert plan.token_index.tolist() == want.tolist()


def test_short_sequences_balance_attention_cost():
    """Longest first, each to the rank with the least sum of squared lengths (ties to the
    lower rank); the split sequence loads every rank alike."""
    lengths = [5, 9, 3, 8, 40, 1, 7]
    per_rank = plans(lengths, 3, 20)
    owners = {}
    for rank, plan in enumerate(per_rank):
        for b in plan.segment_sequence.tolist():
            if b != 4:
                owners[b] = rank
    # 9 -> 0 (81), 8 -> 1 (64), 7 -> 2 (49), 5 -> 2 (74), 3 -> 1 (73), 1 -> 1 (74)
    assert owners == {1: 0, 3: 1, 6: 2, 0: 2, 2: 1, 5: 1}
    costs = [sum(lengths[b] ** 2 for b, r in owners.items() if r == rank) for rank in range(3)]
    assert max(costs) - min(costs) <= 9 ** 2
    assert [p.segment_sequence.tolist().count(4) for p in per_rank] == [2, 2, 2]


def test_nothing_split_at_or_under_the_threshold():
    per_rank = plans([6, 6, 6, 6], 2, 6)
    assert all(p.send_len == 0 and p.key_is_remote.sum() == 0 for p in per_rank)
    assert sorted(len(p.segment_sequence) for p in per_rank) == [2, 2]


def simulate_keys(per_rank, values):
    """Each rank's keys, built as the exchange does: its send rows padded to send_len,
    all-gathered, picked by key_source."""
    send_len = per_rank[0].send_len
    buffers = []
    for plan in per_rank:
        local = values[plan.token_index]
        send = np.full(send_len, -1)
        send[: plan.send_index.size] = local[plan.send_index]
        buffers.append(send)
    gathered = np.concatenate(buffers)
    keys = []
    for plan in per_rank:
        rows = np.concatenate([values[plan.token_index], gathered])
        keys.append(rows[np.where(plan.key_is_remote, plan.num_tokens + plan.key_source, plan.key_source)])
    return keys


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("causal, contextual_len", [(True, 0), (True, 3), (False, 0)])
def test_every_token_once_and_every_segment_gets_its_keys(seed, causal, contextual_len):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 5))
    lengths = rng.integers(0, 60, int(rng.integers(1, 8)))
    threshold = int(rng.integers(2 * size, 30))
    per_rank = plans(lengths, size, threshold, causal=causal, contextual_len=contextual_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.arange(offsets[-1]) * 7 + 3
    assert np.array_equal(np.sort(np.concatenate([p.token_index for p in per_rank])), np.arange(offsets[-1]))
    assert len({p.send_len for p in per_rank}) == 1
    for plan, keys in zip(per_rank, simulate_keys(per_rank, values)):
        assert np.all(np.diff(plan.token_index) > 0)  # batch order
        local_starts = np.concatenate([[0], np.cumsum(plan.segment_length)])
        key_starts = np.concatenate([[0], np.cumsum(plan.key_length)])
        for s, b in enumerate(plan.segment_sequence):
            start, n, m = plan.segment_start[s], plan.segment_length[s], plan.key_length[s]
            local = values[plan.token_index][local_starts[s] : local_starts[s + 1]]
            assert local.tolist() == (values[offsets[b] + start + np.arange(n)]).tolist()  # global positions
            assert keys[key_starts[s] : key_starts[s + 1]].tolist() == values[offsets[b] + np.arange(m)].tolist()
            assert plan.key_token[key_starts[s] : key_starts[s + 1]].tolist() == (offsets[b] + np.arange(m)).tolist()
            end = start + n
            want = lengths[b] if not causal else min(lengths[b], max(end, contextual_len))
            assert m == (want if n else 0)
        # Key gradients go back by two scatters: each group's rows are distinct.
        rows = np.where(plan.key_is_remote, plan.num_tokens + plan.key_source, plan.key_source)
        for group in (plan.key_is_second, ~plan.key_is_second):
            assert np.unique(rows[group]).size == rows[group].size
    ended = sorted(b for p in per_rank for b in p.last_sequence.tolist())
    assert ended == [b for b in range(lengths.size) if lengths[b] > 0]
    for plan in per_rank:
        tokens = plan.token_index[plan.last_token]
        assert tokens.tolist() == (offsets[plan.last_sequence + 1] - 1).tolist()


def test_plan_is_deterministic():
    a = plan_context_split([30, 2, 17, 5, 5], size=2, rank=1, split_threshold=10)
    b = plan_context_split([30, 2, 17, 5, 5], size=2, rank=1, split_threshold=10)
    for name in a.__dataclass_fields__:
        assert np.array_equal(getattr(a, name), getattr(b, name))
