"""Triton kernels of the hash-table ops, with the signatures of their PyTorch references
(:mod:`megatron_gr.ops.pytorch.id_hash`, ``hash_probe``, ``dynamic_rows``).

The probe runs one program per bucket that has queries (queries arrive sorted by routing
key, hence grouped by bucket): the program holds its bucket in registers, finds the hits of
its first queries in one comparison and serves the inserts one after the other, so no two
programs ever touch the same slot and the outcome (which slot, which victim) is
deterministic and equal to the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.pytorch import hash_probe, id_hash
from megatron_gr.ops.pytorch.hash_probe import NOT_STORED, POLICIES, ProbeResult

# Kernels read module constants only as constexpr.
MIX1 = tl.constexpr(id_hash.MIX1)
MIX2 = tl.constexpr(id_hash.MIX2)
GOLDEN = tl.constexpr(id_hash.GOLDEN)
INIT_SHIFT = tl.constexpr(64 - id_hash.INIT_BITS)
INIT_OFFSET = tl.constexpr(1 - 2**id_hash.INIT_BITS)
HIT = tl.constexpr(hash_probe.HIT)
INSERTED = tl.constexpr(hash_probe.INSERTED)
REPLACED = tl.constexpr(hash_probe.REPLACED)
NO_ROOM = tl.constexpr(hash_probe.NO_ROOM)
NOT_STORED_C = tl.constexpr(hash_probe.NOT_STORED)
EMPTY_BIG = tl.constexpr(2**62)  # larger than any step: "never evictable" and "no minimum yet"
# Queries of one bucket a probe program loads at once (with ~3 per bucket and call typical,
# more are served one at a time).
PROBE_HEAD = 8


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
def _insert(
    j, q, qt, c, wants, missed, k, t, seen, fr, hit_lanes, lane, base, step,
    keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr, slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
    BUCKET: tl.constexpr, LANES: tl.constexpr, POLICY: tl.constexpr,
):
    """Phase 2 for query ``j`` (a miss when ``missed``): the bucket's first free lane, else
    the policy's victim among lanes not seen at ``step`` nor found by this call. Writes the
    slot and the query's outcome; returns the bucket's updated registers."""
    in_bucket = lane < BUCKET
    free_lane = tl.min(tl.where(in_bucket & (seen < 0), lane, LANES))
    victim = free_lane * 0 + LANES
    if POLICY != 0:
        evictable = in_bucket & (seen >= 0) & (seen < step) & ~hit_lanes
        if POLICY == 1:
            oldest = tl.min(tl.where(evictable, seen, EMPTY_BIG))
            victim = tl.min(tl.where(evictable & (seen == oldest), lane, LANES))
        else:
            rarest = tl.min(tl.where(evictable, fr, EMPTY_BIG))
            tied = evictable & (fr == rarest)
            oldest = tl.min(tl.where(tied, seen, EMPTY_BIG))
            victim = tl.min(tl.where(tied & (seen == oldest), lane, LANES))
    chosen = tl.where(free_lane < LANES, free_lane, victim)
    placed = missed & wants & (chosen < LANES)
    picked = (lane == chosen) & placed
    replaced = placed & (free_lane == LANES)
    slot = base + chosen
    status = tl.where(placed, tl.where(replaced, REPLACED, INSERTED), tl.where(wants, NO_ROOM, NOT_STORED_C))
    tl.store(slots_ptr + j, tl.where(placed, slot, -1), mask=missed)
    tl.store(status_ptr + j, status.to(tl.int8), mask=missed)
    tl.store(ev_keys_ptr + j, tl.sum(tl.where(picked, k, 0)), mask=replaced)
    tl.store(ev_tags_ptr + j, tl.sum(tl.where(picked, t, 0)), mask=replaced)
    tl.store(keys_ptr + slot, q, mask=placed)
    tl.store(tags_ptr + slot, qt, mask=placed)
    tl.store(seen_ptr + slot, step.to(tl.int64), mask=placed)
    tl.store(freq_ptr + slot, c, mask=placed)
    tl.store(changed_ptr + slot, tl.full([], 1, tl.uint8), mask=placed)
    k = tl.where(picked, q, k)
    t = tl.where(picked, qt, t)
    seen = tl.where(picked, step, seen)
    fr = tl.where(picked, c, fr)
    return k, t, seen, fr


@triton.jit(do_not_specialize=["num_queries", "num_buckets", "step"])
def _probe_kernel(
    keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr,
    q_keys_ptr, q_tags_ptr, q_hashes_ptr, q_counts_ptr, q_insert_ptr,
    slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
    num_queries, num_buckets, step,
    BUCKET: tl.constexpr, LANES: tl.constexpr, HEAD: tl.constexpr, POLICY: tl.constexpr, UPDATE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    b = _bucket_of(tl.load(q_hashes_ptr + i), num_buckets)
    b_prev = tl.where(i > 0, _bucket_of(tl.load(q_hashes_ptr + i - 1, mask=i > 0, other=0), num_buckets), -1)
    first = b_prev != b  # only the first query of a bucket does the bucket's work

    lane = tl.arange(0, LANES)
    in_bucket = lane < BUCKET
    base = b * BUCKET
    k = tl.load(keys_ptr + base + lane, mask=in_bucket & first, other=0)
    t = tl.load(tags_ptr + base + lane, mask=in_bucket & first, other=0)
    seen = tl.load(seen_ptr + base + lane, mask=in_bucket & first, other=EMPTY_BIG)
    fr = tl.load(freq_ptr + base + lane, mask=in_bucket & first, other=0)

    # The bucket's first HEAD queries, loaded at once (buckets rarely get more per call).
    head = tl.arange(0, HEAD)
    jh = i + head
    in_range = first & (jh < num_queries)
    mine = in_range & (_bucket_of(tl.load(q_hashes_ptr + jh, mask=in_range, other=0), num_buckets) == b)
    n_head = tl.sum(mine.to(tl.int32))
    qk = tl.load(q_keys_ptr + jh, mask=mine, other=0)
    qt = tl.load(q_tags_ptr + jh, mask=mine, other=0)
    qc = tl.load(q_counts_ptr + jh, mask=mine, other=0)
    qw = tl.load(q_insert_ptr + jh, mask=mine, other=0).to(tl.int32)

    # Phase 1: hits, the head in one comparison [HEAD, LANES], then any further queries.
    match = (
        mine[:, None] & in_bucket[None, :] & (seen >= 0)[None, :] & (k[None, :] == qk[:, None]) & (t[None, :] == qt[:, None])
    )
    hit_lane = tl.min(tl.where(match, lane[None, :], LANES), axis=1)
    head_hit = hit_lane < LANES
    tl.store(slots_ptr + jh, base + hit_lane, mask=head_hit)
    tl.store(status_ptr + jh, tl.full([HEAD], HIT, tl.int8), mask=head_hit)
    hit_lanes = tl.max(match.to(tl.int32), axis=0) > 0  # lanes found by this call: never evicted by it
    if UPDATE:
        fr = fr + tl.sum(tl.where(match, qc[:, None], 0), axis=0)
        seen = tl.where(hit_lanes, step, seen)
        tl.store(seen_ptr + base + lane, seen, mask=hit_lanes)
        tl.store(freq_ptr + base + lane, fr, mask=hit_lanes)

    rest = i + HEAD
    rest_bucket = _bucket_of(tl.load(q_hashes_ptr + rest, mask=rest < num_queries, other=0), num_buckets)
    rest_bucket = tl.where((n_head == HEAD) & (rest < num_queries), rest_bucket, -1)
    j = rest
    bj = rest_bucket
    while bj == b:
        q = tl.load(q_keys_ptr + j)
        q_tag = tl.load(q_tags_ptr + j)
        one = in_bucket & (seen >= 0) & (k == q) & (t == q_tag)
        lane_hit = tl.min(tl.where(one, lane, LANES))
        is_hit = lane_hit < LANES
        tl.store(slots_ptr + j, base + lane_hit, mask=is_hit)
        tl.store(status_ptr + j, tl.full([], HIT, tl.int8), mask=is_hit)
        hit_lanes = hit_lanes | one
        if UPDATE:
            new_freq = tl.sum(tl.where(one, fr, 0)) + tl.load(q_counts_ptr + j)
            seen = tl.where(one, step, seen)
            fr = tl.where(one, new_freq, fr)
            tl.store(seen_ptr + base + lane_hit, step.to(tl.int64), mask=is_hit)
            tl.store(freq_ptr + base + lane_hit, new_freq, mask=is_hit)
        j += 1
        bj = tl.where(j < num_queries, _bucket_of(tl.load(q_hashes_ptr + j, mask=j < num_queries, other=0), num_buckets), -1)

    # Phase 2: inserts, in query order: the head from registers, then any further queries.
    for h in tl.static_range(HEAD):
        pick = head == h
        missed = (h < n_head) & (tl.sum(tl.where(pick, head_hit.to(tl.int32), 0)) == 0)
        k, t, seen, fr = _insert(
            i + h, tl.sum(tl.where(pick, qk, 0)), tl.sum(tl.where(pick, qt, 0)), tl.sum(tl.where(pick, qc, 0)),
            tl.sum(tl.where(pick, qw, 0)) != 0, missed, k, t, seen, fr, hit_lanes, lane, base, step,
            keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr, slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
            BUCKET, LANES, POLICY,
        )
    j = rest
    bj = rest_bucket
    while bj == b:
        q = tl.load(q_keys_ptr + j)
        q_tag = tl.load(q_tags_ptr + j)
        missed = tl.max((in_bucket & (seen >= 0) & (k == q) & (t == q_tag)).to(tl.int32)) == 0
        k, t, seen, fr = _insert(
            j, q, q_tag, tl.load(q_counts_ptr + j), tl.load(q_insert_ptr + j) != 0, missed, k, t, seen, fr, hit_lanes,
            lane, base, step,
            keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr, slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
            BUCKET, LANES, POLICY,
        )
        j += 1
        bj = tl.where(j < num_queries, _bucket_of(tl.load(q_hashes_ptr + j, mask=j < num_queries, other=0), num_buckets), -1)


def triton_probe(
    keys, tags, last_seen, freq, changed,
    query_keys, query_tags, query_hashes, query_counts, may_insert,
    *, num_buckets: int, bucket_size: int, step: int, policy: str, update_scores: bool,
) -> ProbeResult:
    count = query_keys.numel()
    device = query_keys.device
    result = ProbeResult(
        slots=torch.full((count,), -1, dtype=torch.int64, device=device),
        status=torch.full((count,), NOT_STORED, dtype=torch.int8, device=device),
        evicted_keys=torch.zeros(count, dtype=torch.int64, device=device),
        evicted_tags=torch.zeros(count, dtype=torch.int32, device=device),
    )
    if count:
        lanes = triton.next_power_of_2(bucket_size)
        _probe_kernel[(count,)](
            keys, tags, last_seen, freq, changed,
            query_keys, query_tags, query_hashes, query_counts, may_insert.to(torch.uint8),
            result.slots, result.status, result.evicted_keys, result.evicted_tags,
            count, num_buckets, step,
            BUCKET=bucket_size, LANES=lanes, HEAD=PROBE_HEAD,
            POLICY=POLICIES[policy], UPDATE=update_scores,
            num_warps=1 if lanes <= 64 else (2 if lanes <= 256 else 4),
        )
    return result


@triton.jit(do_not_specialize=["n", "init0", "init1"])
def _materialize_kernel(
    weights_ptr, state0_ptr, state1_ptr, slots_ptr, status_ptr, ids_ptr, tags_ptr, salts_ptr, scales_ptr, out_ptr,
    n, dim, init0, init1,
    NUM_STATES: tl.constexpr, STATE0_PER_ELEMENT: tl.constexpr, STATE1_PER_ELEMENT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    cols = tl.arange(0, BLOCK_D)
    both = row_ok[:, None] & (cols < dim)[None, :]
    slot = tl.load(slots_ptr + rows, mask=row_ok, other=-1)
    status = tl.load(status_ptr + rows, mask=row_ok, other=NOT_STORED_C)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    tag = tl.load(tags_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    salt = tl.load(salts_ptr + tag, mask=row_ok, other=0)
    scale = tl.load(scales_ptr + tag, mask=row_ok, other=0.0)
    hit = status == HIT
    new = (status == INSERTED) | (status == REPLACED)

    row_bits = _mix64(ids.to(tl.uint64, bitcast=True) ^ salt.to(tl.uint64, bitcast=True))
    col_bits = (cols.to(tl.uint64) + 1) * GOLDEN
    bits = (_mix64(row_bits[:, None] + col_bits[None, :]) >> INIT_SHIFT).to(tl.int64)
    initial = (bits * 2 + INIT_OFFSET).to(tl.float32) * scale[:, None]

    cell = slot[:, None] * dim + cols[None, :]
    stored = tl.load(weights_ptr + cell, mask=both & hit[:, None], other=0.0)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], tl.where(hit[:, None], stored, initial), mask=both)
    fresh = both & new[:, None]
    tl.store(weights_ptr + cell, initial, mask=fresh)
    if NUM_STATES >= 1:
        if STATE0_PER_ELEMENT:
            tl.store(state0_ptr + cell, tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + init0, mask=fresh)
        else:
            tl.store(state0_ptr + slot, tl.zeros([BLOCK_R], tl.float32) + init0, mask=row_ok & new)
    if NUM_STATES >= 2:
        if STATE1_PER_ELEMENT:
            tl.store(state1_ptr + cell, tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + init1, mask=fresh)
        else:
            tl.store(state1_ptr + slot, tl.zeros([BLOCK_R], tl.float32) + init1, mask=row_ok & new)


def row_blocks(dim: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile: the whole row, about 4096 elements."""
    block_d = triton.next_power_of_2(dim)
    return max(1, 4096 // block_d), block_d


def triton_materialize_rows(weights, states, state_init, slots, status, ids, tags, salts, scales) -> torch.Tensor:
    count, dim = ids.numel(), weights.shape[1]
    out = torch.empty(count, dim, dtype=torch.float32, device=weights.device)
    if count == 0:
        return out
    if len(states) > 2:
        raise ValueError(f"at most two optimizer states per row, got {len(states)}")
    padded = list(states) + [weights] * (2 - len(states))
    inits = list(state_init) + [0.0] * (2 - len(state_init))
    block_r, block_d = row_blocks(dim)
    _materialize_kernel[(triton.cdiv(count, block_r),)](
        weights, padded[0], padded[1], slots, status, ids, tags, salts, scales, out,
        count, dim, float(inits[0]), float(inits[1]),
        NUM_STATES=len(states),
        STATE0_PER_ELEMENT=len(states) >= 1 and padded[0].dim() == 2,
        STATE1_PER_ELEMENT=len(states) >= 2 and padded[1].dim() == 2,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out
