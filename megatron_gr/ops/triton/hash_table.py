"""Triton kernels of the hash-table ops, with the signatures of their PyTorch references
(:mod:`megatron_gr.ops.pytorch.id_hash`, ``hash_probe``, ``dynamic_rows``).

The probe runs one program per bucket that has queries (queries arrive sorted by routing
key, hence grouped by bucket): the program holds its bucket in registers and serves the
bucket's queries one after the other, so no two programs ever touch the same slot and the
outcome (which slot, which victim) is deterministic and equal to the reference's.
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


@triton.jit(do_not_specialize=["num_queries", "num_buckets", "step"])
def _probe_kernel(
    keys_ptr, tags_ptr, seen_ptr, freq_ptr, changed_ptr,
    q_keys_ptr, q_tags_ptr, q_hashes_ptr, q_counts_ptr, q_insert_ptr,
    slots_ptr, status_ptr, ev_keys_ptr, ev_tags_ptr,
    num_queries, num_buckets, step,
    BUCKET: tl.constexpr, LANES: tl.constexpr, POLICY: tl.constexpr, UPDATE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    s = tl.load(q_hashes_ptr + i)
    b = (((s >> 32) + 2147483648) * num_buckets) >> 32
    s_prev = tl.load(q_hashes_ptr + i - 1, mask=i > 0, other=0)
    b_prev = tl.where(i > 0, (((s_prev >> 32) + 2147483648) * num_buckets) >> 32, -1)
    # Only the first query of a bucket runs the loops; the others find b_first == -1.
    b_first = tl.where(b_prev != b, b, -1)

    lane = tl.arange(0, LANES)
    in_bucket = lane < BUCKET
    base = b * BUCKET
    k = tl.load(keys_ptr + base + lane, mask=in_bucket & (b_first >= 0), other=0)
    t = tl.load(tags_ptr + base + lane, mask=in_bucket & (b_first >= 0), other=0)
    seen = tl.load(seen_ptr + base + lane, mask=in_bucket & (b_first >= 0), other=EMPTY_BIG)
    fr = tl.load(freq_ptr + base + lane, mask=in_bucket & (b_first >= 0), other=0)
    hit_lanes = lane < 0  # all False: lanes found by this call, never evicted by it

    # Phase 1: hits.
    j = i
    bj = b_first
    while bj == b:
        q = tl.load(q_keys_ptr + j)
        qt = tl.load(q_tags_ptr + j)
        match = in_bucket & (seen >= 0) & (k == q) & (t == qt)
        hit_lane = tl.min(tl.where(match, lane, LANES))
        is_hit = hit_lane < LANES
        tl.store(slots_ptr + j, base + hit_lane, mask=is_hit)
        tl.store(status_ptr + j, tl.full([], HIT, tl.int8), mask=is_hit)
        hit_lanes = hit_lanes | match
        if UPDATE:
            c = tl.load(q_counts_ptr + j)
            new_freq = tl.sum(tl.where(match, fr, 0)) + c
            seen = tl.where(match, step, seen)
            fr = tl.where(match, new_freq, fr)
            tl.store(seen_ptr + base + hit_lane, step.to(tl.int64), mask=is_hit)
            tl.store(freq_ptr + base + hit_lane, new_freq, mask=is_hit)
        j += 1
        s_next = tl.load(q_hashes_ptr + j, mask=j < num_queries, other=0)
        bj = tl.where(j < num_queries, (((s_next >> 32) + 2147483648) * num_buckets) >> 32, -1)

    # Phase 2: inserts, in query order.
    j = i
    bj = b_first
    while bj == b:
        q = tl.load(q_keys_ptr + j)
        qt = tl.load(q_tags_ptr + j)
        c = tl.load(q_counts_ptr + j)
        wants = tl.load(q_insert_ptr + j) != 0
        match = in_bucket & (seen >= 0) & (k == q) & (t == qt)
        missed = tl.max(match.to(tl.int32)) == 0
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
        old_key = tl.sum(tl.where(picked, k, 0))
        old_tag = tl.sum(tl.where(picked, t, 0))
        slot = base + chosen
        status = tl.where(placed, tl.where(replaced, REPLACED, INSERTED), tl.where(wants, NO_ROOM, NOT_STORED_C))
        tl.store(slots_ptr + j, tl.where(placed, slot, -1), mask=missed)
        tl.store(status_ptr + j, status.to(tl.int8), mask=missed)
        tl.store(ev_keys_ptr + j, old_key, mask=replaced)
        tl.store(ev_tags_ptr + j, old_tag, mask=replaced)
        tl.store(keys_ptr + slot, q, mask=placed)
        tl.store(tags_ptr + slot, qt, mask=placed)
        tl.store(seen_ptr + slot, step.to(tl.int64), mask=placed)
        tl.store(freq_ptr + slot, c, mask=placed)
        tl.store(changed_ptr + slot, tl.full([], 1, tl.uint8), mask=placed)
        k = tl.where(picked, q, k)
        t = tl.where(picked, qt, t)
        seen = tl.where(picked, step, seen)
        fr = tl.where(picked, c, fr)
        j += 1
        s_next = tl.load(q_hashes_ptr + j, mask=j < num_queries, other=0)
        bj = tl.where(j < num_queries, (((s_next >> 32) + 2147483648) * num_buckets) >> 32, -1)


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
        _probe_kernel[(count,)](
            keys, tags, last_seen, freq, changed,
            query_keys, query_tags, query_hashes, query_counts, may_insert.to(torch.uint8),
            result.slots, result.status, result.evicted_keys, result.evicted_tags,
            count, num_buckets, step,
            BUCKET=bucket_size, LANES=triton.next_power_of_2(bucket_size),
            POLICY=POLICIES[policy], UPDATE=update_scores,
            num_warps=1 if bucket_size <= 64 else 2,
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
