"""Triton kernels of the hash-table ops, with the signatures of their PyTorch references
(:mod:`megatron_gr.ops.pytorch.id_hash` and ``hash_probe``; rows: :mod:`.dynamic_rows`).

The probe launches one program per query; queries arrive sorted by routing key, hence
grouped by bucket, and the program of a bucket's first query serves the whole bucket (the
others stop after two loads). It holds the bucket in registers, finds the hits of a block of
queries in one comparison, then serves the misses one after the other, so no two programs
ever touch the same slot and the outcome (which slot, which victim) is deterministic and
equal to the reference's. Work per bucket follows its queries: one packed minimum picks an
insert's lane (free lane, else the victim), and the table is written once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.pytorch import hash_probe, id_hash
from megatron_gr.ops.pytorch.hash_probe import POLICIES, ProbeResult

# Kernels read module constants only as constexpr.
MIX1 = tl.constexpr(id_hash.MIX1)
MIX2 = tl.constexpr(id_hash.MIX2)
GOLDEN = tl.constexpr(id_hash.GOLDEN)
HIT = tl.constexpr(hash_probe.HIT)
INSERTED = tl.constexpr(hash_probe.INSERTED)
REPLACED = tl.constexpr(hash_probe.REPLACED)
NO_ROOM = tl.constexpr(hash_probe.NO_ROOM)
NOT_STORED_C = tl.constexpr(hash_probe.NOT_STORED)
NEVER = tl.constexpr(2**62)  # larger than any step: "never evictable" and "no minimum yet"
# Queries of one bucket a probe program compares with its rows at once; a bucket gets about
# three per call in the benchmark's steady state, more take further blocks.
PROBE_BLOCK = 8


@triton.jit
def _mix64(x):
    """splitmix64's finaliser on uint64 (multiplication wraps modulo 2^64)."""
    x = x ^ (x >> 30)
    x = x * MIX1
    x = x ^ (x >> 27)
    x = x * MIX2
    return x ^ (x >> 31)


@triton.jit(do_not_specialize=["n"])
def _routing_keys_kernel(ids_ptr, tags_ptr, out_ptr, n, HAS_TAGS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
    if HAS_TAGS:
        tag = tl.load(tags_ptr + offs, mask=mask, other=0).to(tl.int64).to(tl.uint64, bitcast=True)
        x = x + tag * GOLDEN
    tl.store(out_ptr + offs, _mix64(x).to(tl.int64, bitcast=True), mask=mask)


def triton_routing_keys(ids: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(ids)
    n = ids.numel()
    if n:
        block = 1024
        _routing_keys_kernel[(triton.cdiv(n, block),)](ids, tags if tags is not None else ids, out, n, HAS_TAGS=tags is not None, BLOCK=block)
    return out


@triton.jit
def _bucket_of(hashes, num_buckets):
    """``bucket_ids`` of :mod:`megatron_gr.ops.pytorch.id_hash`."""
    return (((hashes >> 32) + 2147483648) * num_buckets) >> 32


@triton.jit
def _insert_key(seen, fr, lane, step, LANES: tl.constexpr, POLICY: tl.constexpr):
    """The smallest of these per-lane keys names the lane an insert takes: a free lane by its
    position (< LANES), else, with eviction, the policy's victim among rows seen before
    ``step`` as ``(last_seen + 1) * LANES + lane`` (oldest first, then the lowest lane);
    NEVER: no lane. Padding lanes and rows found or filled by this call hold a ``seen`` that
    is neither free nor evictable. (Packing needs last_seen < 2^56: steps never get there.)"""
    free = seen < 0
    position = lane.to(tl.int64)
    if POLICY == 0:
        key = tl.where(free, position, NEVER)
    else:
        evictable = (seen >= 0) & (seen < step)
        if POLICY == 2:  # lfu: the least frequent first, then as lru
            rarest = tl.min(tl.where(evictable, fr, NEVER))
            evictable = evictable & (fr == rarest)
        key = tl.where(free, position, tl.where(evictable, (seen + 1) * LANES + position, NEVER))
    return tl.min(key)


@triton.jit(do_not_specialize=["num_queries", "num_buckets", "step"])
def _probe_kernel(
    keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr,
    q_keys_ptr, q_tags_ptr, q_hashes_ptr, q_counts_ptr, q_insert_ptr,
    slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
    num_queries, num_buckets, step,
    BUCKET: tl.constexpr, LANES: tl.constexpr, BLOCK_Q: tl.constexpr, POLICY: tl.constexpr, UPDATE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    b = _bucket_of(tl.load(q_hashes_ptr + i), num_buckets)
    b_prev = _bucket_of(tl.load(q_hashes_ptr + i - 1, mask=i > 0, other=0), num_buckets)
    if (i == 0) | (b_prev != b):  # the bucket's first query: this program serves the bucket
        lane = tl.arange(0, LANES)
        in_bucket = lane < BUCKET
        base = b * BUCKET
        k = tl.load(keys_ptr + base + lane, mask=in_bucket, other=0)
        t = tl.load(tags_ptr + base + lane, mask=in_bucket, other=0)
        seen = tl.load(seen_ptr + base + lane, mask=in_bucket, other=NEVER)  # padding: never free nor evictable
        if POLICY == 2:
            fr = tl.load(freq_ptr + base + lane, mask=in_bucket, other=0)
        else:
            fr = seen  # unused
        stored = in_bucket & (seen >= 0)

        # Phase 1, hits: a block of the bucket's queries against its rows at once. Queries
        # are sorted by key, so the bucket's are a run starting at i; a full block means
        # the run may go on.
        found = lane < 0  # rows found by this call (never evicted by it)
        j = i
        run = BLOCK_Q
        while run == BLOCK_Q:
            jq = j + tl.arange(0, BLOCK_Q)
            in_range = jq < num_queries
            mine = in_range & (_bucket_of(tl.load(q_hashes_ptr + jq, mask=in_range, other=0), num_buckets) == b)
            qk = tl.load(q_keys_ptr + jq, mask=mine, other=0)
            qt = tl.load(q_tags_ptr + jq, mask=mine, other=0)
            match = mine[:, None] & stored[None, :] & (k[None, :] == qk[:, None]) & (t[None, :] == qt[:, None])
            hit_lane = tl.min(tl.where(match, lane[None, :], LANES), axis=1)
            hit = hit_lane < LANES
            tl.store(slots_ptr + jq, tl.where(hit, base + hit_lane, -1), mask=mine)
            tl.store(status_ptr + jq, tl.where(hit, HIT, NOT_STORED_C).to(tl.int8), mask=mine)
            if UPDATE:  # distinct rows, one add each: exact in any order, and no round trip
                qc = tl.load(q_counts_ptr + jq, mask=hit, other=0)
                tl.atomic_add(freq_ptr + base + hit_lane, qc, mask=hit, sem="relaxed")
            found = found | (tl.max(match.to(tl.int32), axis=0) > 0)
            run = tl.sum(mine.to(tl.int32))
            j += BLOCK_Q
        end = j - BLOCK_Q + run
        if UPDATE:
            tl.store(seen_ptr + base + lane, tl.zeros_like(seen) + step, mask=found)
        seen = tl.where(found, step, seen)
        tl.debug_barrier()  # every thread sees phase 1's statuses

        # Phase 2, inserts in query order. The table's rows are written once at the end, so
        # a victim's id is still in memory when read here.
        filled = lane < 0
        new_k = k
        new_t = t
        new_c = tl.zeros_like(seen)
        for jj in range(i, end):
            missed = tl.load(status_ptr + jj) != HIT
            wants = tl.load(q_insert_ptr + jj) != 0
            q = tl.load(q_keys_ptr + jj)
            q_tag = tl.load(q_tags_ptr + jj)
            count = tl.load(q_counts_ptr + jj)
            if missed & wants:
                best = _insert_key(seen, fr, lane, step, LANES, POLICY)
                placed = best < NEVER
                chosen = (best & (LANES - 1)).to(tl.int32)
                replaced = placed & (best >= LANES)
                slot = base + chosen
                tl.store(ev_keys_ptr + jj, tl.load(keys_ptr + slot, mask=replaced, other=0), mask=replaced)
                tl.store(ev_tags_ptr + jj, tl.load(tags_ptr + slot, mask=replaced, other=0), mask=replaced)
                tl.store(slots_ptr + jj, tl.where(placed, slot, -1))
                tl.store(status_ptr + jj, tl.where(placed, tl.where(replaced, REPLACED, INSERTED), NO_ROOM).to(tl.int8))
                pick = placed & (lane == chosen)
                seen = tl.where(pick, step, seen)
                filled = filled | pick
                new_k = tl.where(pick, q, new_k)
                new_t = tl.where(pick, q_tag, new_t)
                new_c = tl.where(pick, count, new_c)
        tl.store(keys_ptr + base + lane, new_k, mask=filled)
        tl.store(tags_ptr + base + lane, new_t, mask=filled)
        tl.store(seen_ptr + base + lane, tl.zeros_like(seen) + step, mask=filled)
        tl.store(freq_ptr + base + lane, new_c, mask=filled)
        tl.store(changed_ptr + base + lane, tl.full([LANES], 1, tl.uint8), mask=filled)


def triton_probe(
    keys, tags, last_seen, freq, changed,
    query_keys, query_tags, query_hashes, query_counts, may_insert,
    *, num_buckets: int, bucket_size: int, step: int, policy: str, update_scores: bool,
) -> ProbeResult:
    count = query_keys.numel()
    device = query_keys.device
    # The kernel writes slots and status of every query; evicted ids only where REPLACED.
    result = ProbeResult(
        slots=torch.empty(count, dtype=torch.int64, device=device),
        status=torch.empty(count, dtype=torch.int8, device=device),
        evicted_keys=torch.zeros(count, dtype=torch.int64, device=device),
        evicted_tags=torch.zeros(count, dtype=torch.int32, device=device),
    )
    if count:
        lanes = triton.next_power_of_2(bucket_size)
        _probe_kernel[(count,)](
            keys, tags, last_seen, freq, changed,
            query_keys, query_tags, query_hashes, query_counts, may_insert.view(torch.uint8),
            result.slots, result.status, result.evicted_keys, result.evicted_tags,
            count, num_buckets, step,
            BUCKET=bucket_size, LANES=lanes, BLOCK_Q=PROBE_BLOCK,
            POLICY=POLICIES[policy], UPDATE=update_scores,
            num_warps=1 if lanes <= 64 else (2 if lanes <= 256 else 4),
        )
    return result
