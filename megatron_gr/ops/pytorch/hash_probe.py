"""Reference find-or-insert over a bucketed hash table (vectorised PyTorch, any device).

The table is ``num_buckets x bucket_size`` slots; slot ``b * bucket_size + j`` is the j-th
slot of bucket b. Per slot: ``keys`` (int64 id), ``tags`` (int32 logical table),
``last_seen`` (int64 step, -1 = empty slot), ``freq`` (int64 occurrences) and ``changed``
(uint8, set when the slot receives a new id).

Semantics, which the Triton kernel reproduces exactly, for queries grouped by bucket:
1. every query that matches a stored (id, tag) is a hit; with ``update_scores`` its
   ``last_seen`` becomes ``step`` and its ``freq`` grows by the query's count;
2. then, bucket by bucket and in query order, every other query allowed to insert takes
   the bucket's first empty slot; in a full bucket it replaces the lowest-scored row not seen
   at ``step`` (``lru``: smallest last_seen; ``lfu``: smallest freq, then smallest
   last_seen; ties: the lowest slot), or gets no slot (``none``, or every row seen at
   ``step``). Hits first: a row found by this call is never evicted by this call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gr.ops.pytorch.id_hash import bucket_ids

HIT, INSERTED, REPLACED, NOT_STORED, NO_ROOM = 0, 1, 2, 3, 4
PADDING = -1  # an entry past the queries (a probe of padded queries, see ``ops.hash_table.probe``)
POLICIES = {"none": 0, "lru": 1, "lfu": 2}
_BIG = torch.iinfo(torch.int64).max


@dataclass
class ProbeResult:
    slots: torch.Tensor  # [U] int64, -1 where the query has no row
    status: torch.Tensor  # [U] int8: HIT, INSERTED, REPLACED (inserted over an evicted row), NOT_STORED, NO_ROOM (PADDING)
    evicted_keys: torch.Tensor  # [U] int64, the id a REPLACED query evicted
    evicted_tags: torch.Tensor  # [U] int32


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of ``[M, S]`` (S where none)."""
    size = mask.shape[1]
    positions = torch.arange(size, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, size).min(dim=1).values


def _rank_within_bucket(buckets: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... along each run of equal buckets (queries are grouped by bucket)."""
    n = buckets.numel()
    positions = torch.arange(n, device=buckets.device)
    starts = torch.ones(n, dtype=torch.bool, device=buckets.device)
    starts[1:] = buckets[1:] != buckets[:-1]
    run_start = torch.cummax(torch.where(starts, positions, 0), dim=0).values
    return positions - run_start


def pytorch_probe(
    keys: torch.Tensor,
    tags: torch.Tensor,
    last_seen: torch.Tensor,
    freq: torch.Tensor,
    changed: torch.Tensor,
    query_keys: torch.Tensor,
    query_tags: torch.Tensor,
    query_hashes: torch.Tensor,
    query_counts: torch.Tensor,
    may_insert: torch.Tensor,
    *,
    num_buckets: int,
    bucket_size: int,
    step: int,
    policy: str,
    update_scores: bool,
) -> ProbeResult:
    """Find-or-insert ``U`` distinct (id, tag) queries sorted by routing key (so grouped by
    bucket); updates the table in place. See the module docstring."""
    device = query_keys.device
    query_buckets = bucket_ids(query_hashes, num_buckets)
    count = query_keys.numel()
    slots = torch.full((count,), -1, dtype=torch.int64, device=device)
    status = torch.full((count,), NOT_STORED, dtype=torch.int8, device=device)
    evicted_keys = torch.zeros(count, dtype=torch.int64, device=device)
    evicted_tags = torch.zeros(count, dtype=torch.int32, device=device)
    result = ProbeResult(slots, status, evicted_keys, evicted_tags)
    if count == 0:
        return result
    lane = torch.arange(bucket_size, device=device)
    base = query_buckets * bucket_size  # [U]
    candidates = base[:, None] + lane  # [U, S]
    match = (
        (last_seen[candidates] >= 0)
        & (keys[candidates] == query_keys[:, None])
        & (tags[candidates] == query_tags[:, None])
    )
    hit = match.any(dim=1)
    hit_slots = base[hit] + _first_true(match[hit])
    slots[hit] = hit_slots
    status[hit] = HIT
    if update_scores:
        last_seen[hit_slots] = step
        freq[hit_slots] += query_counts[hit]

    waiting = torch.nonzero(~hit & may_insert).squeeze(1)
    if waiting.numel() == 0:
        return result
    rank = _rank_within_bucket(query_buckets[waiting])
    for r in range(int(rank.max()) + 1):  # round r: the r-th insert of each bucket
        queries = waiting[rank == r]  # in distinct buckets
        cand = base[queries][:, None] + lane  # [M, S]
        seen = last_seen[cand]
        free = _first_true(seen < 0)
        chosen = free.clone()
        full = free == bucket_size
        if policy != "none" and bool(full.any()):
            evictable = (seen >= 0) & (seen < step) & ~torch.isin(cand, hit_slots)
            if policy == "lru":
                victim = torch.where(evictable, seen, _BIG).argmin(dim=1)
            else:
                counts = torch.where(evictable, freq[cand], _BIG)
                least = counts == counts.min(dim=1, keepdim=True).values
                victim = torch.where(evictable & least, seen, _BIG).argmin(dim=1)
            victim = torch.where(evictable.any(dim=1), victim, bucket_size)
            chosen = torch.where(full, victim, free)
        placed = chosen < bucket_size
        status[queries[~placed]] = NO_ROOM
        queries, cand_slot = queries[placed], base[queries[placed]] + chosen[placed]
        replaced = last_seen[cand_slot] >= 0
        evicted_keys[queries[replaced]] = keys[cand_slot[replaced]]
        evicted_tags[queries[replaced]] = tags[cand_slot[replaced]]
        status[queries] = torch.where(replaced, REPLACED, INSERTED).to(torch.int8)
        slots[queries] = cand_slot
        keys[cand_slot] = query_keys[queries]
        tags[cand_slot] = query_tags[queries]
        last_seen[cand_slot] = step
        freq[cand_slot] = query_counts[queries]
        changed[cand_slot] = 1
    return result
