"""PyTorch references of the dynamic-embedding ops against independent implementations: the
vectorised probe against a slot-by-slot Python simulation of the documented semantics, the
row-sparse optimizers against torch.optim."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.ops import hash_table
from megatron_gr.ops.pytorch.hash_probe import HIT, INSERTED, NO_ROOM, NOT_STORED, REPLACED
from megatron_gr.ops.pytorch.id_hash import bucket_ids
from megatron_gr.ops.sparse_optimizers import sparse_update
from tests.support.parity import assert_close_to_scale
from tests.unit.ops.hash_table_inputs import empty_table, random_queries


def simulate(table, ids, tags, hashes, counts, may_insert, *, num_buckets, bucket_size, step, policy, update_scores):
    """The probe's documented semantics, one query and one slot at a time."""
    keys, slot_tags, seen, freq = (table[k].tolist() for k in ("keys", "tags", "last_seen", "freq"))
    buckets = bucket_ids(hashes, num_buckets).tolist()
    n = len(buckets)
    slots, status = [-1] * n, [NOT_STORED] * n
    found = set()
    for j in range(n):  # hits first
        start = buckets[j] * bucket_size
        for s in range(start, start + bucket_size):
            if seen[s] >= 0 and keys[s] == int(ids[j]) and slot_tags[s] == int(tags[j]):
                slots[j], status[j] = s, HIT
                found.add(s)
                if update_scores:
                    seen[s], freq[s] = step, freq[s] + int(counts[j])
    for j in range(n):  # then inserts, in query order
        if status[j] == HIT or not bool(may_insert[j]):
            continue
        lanes = range(buckets[j] * bucket_size, (buckets[j] + 1) * bucket_size)
        free = [s for s in lanes if seen[s] < 0]
        candidates = [s for s in lanes if 0 <= seen[s] < step and s not in found]
        if free:
            chosen, replaced = free[0], False
        elif policy == "none" or not candidates:
            status[j] = NO_ROOM
            continue
        else:
            score = (lambda s: (seen[s], s)) if policy == "lru" else (lambda s: (freq[s], seen[s], s))
            chosen, replaced = min(candidates, key=score), True
        keys[chosen], slot_tags[chosen], seen[chosen], freq[chosen] = int(ids[j]), int(tags[j]), step, int(counts[j])
        slots[j], status[j] = chosen, REPLACED if replaced else INSERTED
    return slots, status, {"keys": keys, "tags": slot_tags, "last_seen": seen, "freq": freq}


@pytest.mark.parametrize("policy", ["lru", "lfu", "none"])
@pytest.mark.parametrize("bucket_size", [1, 3, 8])
def test_probe_reference_follows_the_documented_semantics(policy, bucket_size):
    generator = torch.Generator().manual_seed(bucket_size)
    num_buckets = 5
    table = empty_table(num_buckets, bucket_size)
    for step in range(10):
        queries = random_queries(generator, 30)
        update = step % 4 != 3
        expected = simulate(table, *queries, num_buckets=num_buckets, bucket_size=bucket_size, step=step, policy=policy, update_scores=update)
        result = hash_table.probe(
            *(table[k] for k in ("keys", "tags", "last_seen", "freq", "changed")), *queries,
            num_buckets=num_buckets, bucket_size=bucket_size, step=step, policy=policy, update_scores=update,
        )
        assert result.slots.tolist() == expected[0]
        assert result.status.tolist() == expected[1]
        occupied = table["last_seen"] >= 0
        for name, values in expected[2].items():
            assert table[name][occupied].tolist() == torch.tensor(values)[occupied].tolist(), name


def test_probe_rejects_wrong_dtypes():
    table = empty_table(2, 2)
    ids = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_keys must be torch.int64"):
        hash_table.probe(*table.values(), ids, ids, ids.long(), ids.long(), torch.ones(2, dtype=torch.bool),
                         num_buckets=2, bucket_size=2, step=0, policy="lru", update_scores=True)


def test_sgd_and_adagrad_match_torch_optim():
    generator = torch.Generator().manual_seed(0)
    for name, make in (
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.3)),
        ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-8, initial_accumulator_value=0.2)),
    ):
        weights = torch.randn(10, 5, generator=generator)
        dense = torch.nn.Parameter(weights.clone())
        optimizer = make([dense])
        states = [torch.full((10, 5), 0.2)] if name == "adagrad" else []
        for _ in range(3):
            slots = torch.randperm(10, generator=generator)[:6]
            grads = torch.randn(6, 5, generator=generator)
            dense.grad = torch.zeros(10, 5).index_put((slots,), grads * 0.5)
            optimizer.step()
            sparse_update(weights, states, slots, grads, optimizer=name, lr=0.3, step=1, eps=1e-8, grad_scale=0.5)
        # Other formulas, other roundings: entries that cancel near 0 differ by an ulp of the
        # operands (~1), not of themselves; a wrong update moves weights by about lr = 0.3.
        assert_close_to_scale(weights, dense.detach(), rtol=1e-6, what=name)


def test_adam_matches_torch_adam_on_rows_touched_every_step():
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(6, 4, generator=generator)
    dense = torch.nn.Parameter(weights.clone())
    optimizer = torch.optim.Adam([dense], lr=0.01, betas=(0.9, 0.98), eps=1e-8)
    states = [torch.zeros(6, 4), torch.zeros(6, 4)]
    for step in range(1, 5):
        grads = torch.randn(6, 4, generator=generator)
        dense.grad = grads.clone()
        optimizer.step()
        sparse_update(weights, states, torch.arange(6).flip(0), grads.flip(0), optimizer="adam", lr=0.01, step=step, beta1=0.9, beta2=0.98)
    assert_close_to_scale(weights, dense.detach(), rtol=1e-5, what="adam")  # as above; steps of lr = 0.01


def test_rowwise_adagrad_keeps_one_sum_per_row_and_skips_negative_slots():
    weights, total = torch.ones(3, 2), torch.zeros(3)
    grads = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    sparse_update(weights, [total], torch.tensor([2, -1]), grads, optimizer="rowwise_adagrad", lr=1.0, step=1, eps=0.0)
    assert total.tolist() == [0.0, 0.0, 12.5]  # mean of 9 and 16
    torch.testing.assert_close(weights[2], 1 - torch.tensor([3.0, 4.0]) / 12.5**0.5)
    assert weights[:2].eq(1).all()


@pytest.mark.parametrize("optimizer, shapes", [("adagrad", ["row"]), ("rowwise_adagrad", ["scalar"]), ("adam", ["row", "row"])])
def test_a_fresh_flag_stands_for_the_initial_state(optimizer, shapes):
    """Rows flagged fresh update as if their state held ``state_init``; the update clears
    their flag and writes their state; flagged rows without a gradient keep theirs."""
    generator = torch.Generator().manual_seed(4)
    capacity, dim, init = 12, 3, 0.2
    states = [torch.rand(capacity, dim) if s == "row" else torch.rand(capacity) for s in shapes]
    fresh = torch.zeros(capacity, dtype=torch.uint8)
    fresh[[1, 2, 5, 7]] = 1
    written = [s.clone().index_fill_(0, torch.tensor([1, 2, 5, 7]), init) for s in states]
    slots, grads = torch.tensor([2, 3, 7, -1, 9]), torch.randn(5, dim, generator=generator)
    weights = torch.randn(capacity, dim, generator=generator)
    flagged, plain = weights.clone(), weights.clone()
    options = dict(optimizer=optimizer, lr=0.1, step=2, beta1=0.9, beta2=0.98, eps=1e-8)
    sparse_update(flagged, states, slots, grads, fresh=fresh, state_init=[init] * len(states), **options)
    sparse_update(plain, written, slots, grads, **options)
    assert torch.equal(flagged, plain)
    for a, b in zip(states, written):
        assert torch.equal(a[[2, 3, 7, 9]], b[[2, 3, 7, 9]])
    assert fresh.nonzero().squeeze(1).tolist() == [1, 5]
