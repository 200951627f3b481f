"""Triton kernels of the hash-table ops, with the signatures of their PyTorch references
(:mod:`megatron_gr.ops.pytorch.id_hash` and ``hash_probe``; rows: :mod:`.dynamic_rows`).

The probe launches one program per bucket run: queries arrive sorted by routing key, hence
grouped by bucket, and a first small kernel compacts the start of every run (with its
bucket) on the device; the grid is ``min(queries, buckets)``, an upper bound known on the
host, and programs past the number of runs stop at once. A program holds the bucket in
registers, finds the hits of a block of queries in one comparison, then serves the misses
one after the other in registers, so no two programs ever touch the same slot and the
outcome (which slot, which victim) is deterministic and equal to the reference's. Work per
bucket follows its queries: one packed minimum picks an insert's lane (free lane, else the
victim), and the table and the results are written once per block.
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
RUNS_BLOCK = 1024  # queries per program of the run compaction


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
def _smallest_with(key_a, k_a, t_a, key_b, k_b, t_b):
    b_less = key_b < key_a
    return tl.where(b_less, key_b, key_a), tl.where(b_less, k_b, k_a), tl.where(b_less, t_b, t_a)


@triton.jit
def _insert_key(seen, fr, k, t, lane, step, LANES: tl.constexpr, POLICY: tl.constexpr):
    """The smallest of these per-lane keys names the lane an insert takes: a free lane by its
    position (< LANES), else, with eviction, the policy's victim among rows seen before
    ``step`` as ``(last_seen + 1) * LANES + lane`` (oldest first, then the lowest lane);
    NEVER: no lane. Padding lanes and rows found or filled by this call hold a ``seen`` that
    is neither free nor evictable. (Packing needs last_seen < 2^56: steps never get there.)
    Returns that key and the lane's id and tag (``k``, ``t``), in one reduction."""
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
    return tl.reduce((key, k, t), 0, _smallest_with)  # keys differ but at NEVER (no lane)


@triton.jit
def _query_count(n, valid_ptr, VALID_ON_DEVICE: tl.constexpr):
    """The number of queries: ``n``, or the count at ``valid_ptr`` (the first of ``n`` entries)."""
    if VALID_ON_DEVICE:
        n = tl.load(valid_ptr)
    return n


@triton.jit(do_not_specialize=["n", "num_buckets"])
def _bucket_runs_kernel(
    q_hashes_ptr, starts_ptr, buckets_ptr, runs_ptr, valid_ptr, n, num_buckets, VALID_ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Compaction of the bucket runs of sorted queries: every query that starts a run (its
    bucket differs from the previous query's) gets a place in ``starts``/``buckets`` from one
    atomic add per block. The runs land in no fixed order, which changes nothing: each is
    served by one program, independently of the others."""
    n = _query_count(n, valid_ptr, VALID_ON_DEVICE)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    b = _bucket_of(tl.load(q_hashes_ptr + offs, mask=ok, other=0), num_buckets)
    b_prev = _bucket_of(tl.load(q_hashes_ptr + offs - 1, mask=ok & (offs > 0), other=0), num_buckets)
    first = ok & ((offs == 0) | (b != b_prev))
    flags = first.to(tl.int32)
    place = tl.atomic_add(runs_ptr, tl.sum(flags)) + tl.cumsum(flags) - flags
    tl.store(starts_ptr + place, offs, mask=first)
    tl.store(buckets_ptr + place, b, mask=first)


@triton.jit
def _pick(values, positions, at):
    """``values[at]`` of a small vector (a reduction: registers only)."""
    return tl.sum(tl.where(positions == at, values, tl.zeros_like(values)))


@triton.jit
def _query_block(
    q_hashes_ptr, q_keys_ptr, q_tags_ptr, q_counts_ptr, q_insert_ptr, jq, limit, num_buckets, b, k, t, stored, lane,
    LANES: tl.constexpr, BY_BUCKET: tl.constexpr,
):
    """Queries ``jq`` (below ``limit``) of the run of bucket ``b`` and the lane each finds
    among the bucket's stored rows (LANES: none). ``BY_BUCKET``: the run ends where the
    bucket changes (its end is not known yet)."""
    # Loaded by range, not by bucket: the loads go out together with the hashes'.
    in_range = jq < limit
    qk = tl.load(q_keys_ptr + jq, mask=in_range, other=0)
    qt = tl.load(q_tags_ptr + jq, mask=in_range, other=0)
    qc = tl.load(q_counts_ptr + jq, mask=in_range, other=0)
    qw = tl.load(q_insert_ptr + jq, mask=in_range, other=0) != 0
    mine = in_range
    if BY_BUCKET:
        mine = mine & (_bucket_of(tl.load(q_hashes_ptr + jq, mask=in_range, other=0), num_buckets) == b)
    match = mine[:, None] & stored[None, :] & (k[None, :] == qk[:, None]) & (t[None, :] == qt[:, None])
    hit_lane = tl.min(tl.where(match, lane[None, :], LANES), axis=1)
    return mine, qk, qt, qc, qw, match, hit_lane


@triton.jit(do_not_specialize=["num_queries", "num_buckets", "step"])
def _probe_kernel(
    keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr,
    q_keys_ptr, q_tags_ptr, q_hashes_ptr, q_counts_ptr, q_insert_ptr,
    slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
    starts_ptr, buckets_ptr, runs_ptr, valid_ptr,
    num_queries, num_buckets, step,
    BUCKET: tl.constexpr, LANES: tl.constexpr, BLOCK_Q: tl.constexpr, POLICY: tl.constexpr, UPDATE: tl.constexpr,
    VALID_ON_DEVICE: tl.constexpr,
):
    num_queries = _query_count(num_queries, valid_ptr, VALID_ON_DEVICE)
    r = tl.program_id(0)
    i = tl.load(starts_ptr + r)  # entries past the runs hold garbage, unused
    b = tl.load(buckets_ptr + r)
    if r < tl.load(runs_ptr):
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
        qi = tl.arange(0, BLOCK_Q)

        # Phase 1, hits: every block of the run against the bucket's rows, so that no insert
        # evicts a row the run finds. A full block means the run may go on.
        found = lane < 0  # rows found by this call (never evicted by it)
        j = i
        run = BLOCK_Q
        while run == BLOCK_Q:
            mine, qk, qt, qc, qw, match, hit_lane = _query_block(
                q_hashes_ptr, q_keys_ptr, q_tags_ptr, q_counts_ptr, q_insert_ptr, j + qi, num_queries, num_buckets,
                b, k, t, stored, lane, LANES, True,
            )
            found = found | (tl.max(match.to(tl.int32), axis=0) > 0)
            if UPDATE:  # distinct rows, one add each: exact in any order, and no round trip
                tl.atomic_add(freq_ptr + base + hit_lane, qc, mask=hit_lane < LANES, sem="relaxed")
            run = tl.sum(mine.to(tl.int32))
            j += BLOCK_Q
        end = j - BLOCK_Q + run
        if UPDATE:
            tl.store(seen_ptr + base + lane, tl.zeros_like(seen) + step, mask=found)
        seen = tl.where(found, step, seen)

        # Phase 2, block by block in query order: a hit's result, or an insert's lane (a free
        # lane, else the policy's victim) chosen in registers, its row written at once (no
        # load waits for it), the block's results stored together. A victim's id is the one
        # loaded: a lane filled here is never chosen again.
        for j in range(i, end, BLOCK_Q):
            # The same blocks again (from L1), now that every hit of the run is known.
            mine, qk, qt, qc, qw, match, hit_lane = _query_block(
                q_hashes_ptr, q_keys_ptr, q_tags_ptr, q_counts_ptr, q_insert_ptr, j + qi, end, num_buckets,
                b, k, t, stored, lane, LANES, False,
            )
            hit = hit_lane < LANES
            out_slot = tl.where(hit, base + hit_lane, -1)
            out_status = tl.where(hit, HIT, NOT_STORED_C)
            out_key = tl.zeros_like(qk)
            out_tag = tl.zeros_like(qt)
            todo = mine & ~hit & qw
            nxt = tl.min(tl.where(todo, qi, BLOCK_Q))
            while nxt < BLOCK_Q:
                best, victim_key, victim_tag = _insert_key(seen, fr, k, t, lane, step, LANES, POLICY)
                placed = best < NEVER
                chosen = (best & (LANES - 1)).to(tl.int32)
                replaced = placed & (best >= LANES)
                here = qi == nxt
                out_slot = tl.where(here, tl.where(placed, base + chosen, -1), out_slot)
                out_status = tl.where(here, tl.where(placed, tl.where(replaced, REPLACED, INSERTED), NO_ROOM), out_status)
                out_key = tl.where(here & replaced, victim_key, out_key)
                out_tag = tl.where(here & replaced, victim_tag, out_tag)
                pick = placed & (lane == chosen)
                seen = tl.where(pick, step, seen)
                slot = base + chosen
                tl.store(keys_ptr + slot, _pick(qk, qi, nxt), mask=placed)
                tl.store(tags_ptr + slot, _pick(qt, qi, nxt), mask=placed)
                tl.store(seen_ptr + slot, step, mask=placed)
                tl.store(freq_ptr + slot, _pick(qc, qi, nxt), mask=placed)
                tl.store(changed_ptr + slot, 1, mask=placed)
                todo = todo & ~here
                nxt = tl.min(tl.where(todo, qi, BLOCK_Q))
            jq = j + qi
            tl.store(slots_ptr + jq, out_slot, mask=mine)
            tl.store(status_ptr + jq, out_status.to(tl.int8), mask=mine)
            tl.store(ev_keys_ptr + jq, out_key, mask=mine)
            tl.store(ev_tags_ptr + jq, out_tag, mask=mine)


def triton_probe(
    keys, tags, last_seen, freq, changed,
    query_keys, query_tags, query_hashes, query_counts, may_insert,
    *, num_buckets: int, bucket_size: int, step: int, policy: str, update_scores: bool, valid=None,
) -> ProbeResult:
    count = query_keys.numel()
    device = query_keys.device
    # The kernel writes every field of every query (evicted ids 0 where not REPLACED); past
    # ``valid`` queries it writes nothing, so their slot and status are set first.
    if valid is None:
        slots = torch.empty(count, dtype=torch.int64, device=device)
        status = torch.empty(count, dtype=torch.int8, device=device)
    else:
        slots = torch.full((count,), -1, dtype=torch.int64, device=device)
        status = torch.full((count,), hash_probe.PADDING, dtype=torch.int8, device=device)
    result = ProbeResult(
        slots=slots,
        status=status,
        evicted_keys=torch.empty(count, dtype=torch.int64, device=device),
        evicted_tags=torch.empty(count, dtype=torch.int32, device=device),
    )
    if count:
        # One program per bucket run: a grid of min(count, num_buckets), the runs compacted
        # on the device (programs past their number stop after three loads; no host read).
        # The run buffers hold one entry per query: queries not sorted by bucket (a broken
        # precondition) then make more runs than programs, unserved, but write nothing out
        # of bounds.
        grid = min(count, num_buckets)
        starts = torch.empty(count, dtype=torch.int64, device=device)
        buckets = torch.empty(count, dtype=torch.int64, device=device)
        runs = torch.zeros(1, dtype=torch.int32, device=device)
        on_device = valid is not None
        valid = valid if on_device else runs  # unread
        _bucket_runs_kernel[(triton.cdiv(count, RUNS_BLOCK),)](
            query_hashes, starts, buckets, runs, valid, count, num_buckets, VALID_ON_DEVICE=on_device, BLOCK=RUNS_BLOCK,
            num_warps=4,
        )
        lanes = triton.next_power_of_2(bucket_size)
        _probe_kernel[(grid,)](
            keys, tags, last_seen, freq, changed,
            query_keys, query_tags, query_hashes, query_counts, may_insert.view(torch.uint8),
            result.slots, result.status, result.evicted_keys, result.evicted_tags,
            starts, buckets, runs, valid,
            count, num_buckets, step,
            BUCKET=bucket_size, LANES=lanes, BLOCK_Q=PROBE_BLOCK,
            POLICY=POLICIES[policy], UPDATE=update_scores, VALID_ON_DEVICE=on_device,
            num_warps=1 if lanes <= 64 else (2 if lanes <= 256 else 4),
        )
    return result
