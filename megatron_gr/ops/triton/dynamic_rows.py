"""Triton kernels of the hash-table rows, with the signatures of their PyTorch references
(:mod:`megatron_gr.ops.pytorch.dynamic_rows`): fresh slots initialised, rows read by slot.

Both skip the integer hashing of initial values in tiles that need none (a tile of hits only
initialises nothing; a read of stored rows is a plain gather), which would otherwise cost
more than the memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.pytorch import hash_probe, id_hash
from megatron_gr.ops.triton.hash_table import GOLDEN, _mix64

INIT_SHIFT = tl.constexpr(64 - id_hash.INIT_BITS)
INIT_OFFSET = tl.constexpr(1 - 2**id_hash.INIT_BITS)
INSERTED = tl.constexpr(hash_probe.INSERTED)
REPLACED = tl.constexpr(hash_probe.REPLACED)


# Warps of the row kernels' programs: 16 elements of a 4096-element tile per thread keep
# them under ~90 registers (32 per thread need 170 and halve the warps an SM can hold).
ROW_WARPS = 8


def row_blocks(dim: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile: the whole row, about 4096 elements; launch
    with ``num_warps=ROW_WARPS``."""
    block_d = triton.next_power_of_2(dim)
    return max(1, 4096 // block_d), block_d


@triton.jit
def _initial_rows(ids, tags, salts_ptr, scales_ptr, cols, ok):
    """``initial_values`` of :mod:`megatron_gr.ops.pytorch.id_hash` for a tile of rows."""
    salt = tl.load(salts_ptr + tags, mask=ok, other=0)
    scale = tl.load(scales_ptr + tags, mask=ok, other=0.0)
    row_bits = _mix64(ids.to(tl.uint64, bitcast=True) ^ salt.to(tl.uint64, bitcast=True))
    col_bits = (cols.to(tl.uint64) + 1) * GOLDEN
    bits = (_mix64(row_bits[:, None] + col_bits[None, :]) >> INIT_SHIFT).to(tl.int64)
    return (bits * 2 + INIT_OFFSET).to(tl.float32) * scale[:, None]


@triton.jit(do_not_specialize=["n", "init0", "init1"])
def _init_rows_kernel(
    weights_ptr, state0_ptr, state1_ptr, slots_ptr, status_ptr, ids_ptr, tags_ptr, salts_ptr, scales_ptr,
    n, dim, init0, init1,
    NUM_STATES: tl.constexpr, STATE0_PER_ELEMENT: tl.constexpr, STATE1_PER_ELEMENT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n
    status = tl.load(status_ptr + rows, mask=ok, other=0)
    fresh = ok & ((status == INSERTED) | (status == REPLACED))
    if tl.max(fresh.to(tl.int32)) > 0:
        cols = tl.arange(0, BLOCK_D)
        both = fresh[:, None] & (cols < dim)[None, :]
        slot = tl.load(slots_ptr + rows, mask=fresh, other=0)
        ids = tl.load(ids_ptr + rows, mask=fresh, other=0)
        tag = tl.load(tags_ptr + rows, mask=fresh, other=0).to(tl.int64)
        cell = slot[:, None] * dim + cols[None, :]
        tl.store(weights_ptr + cell, _initial_rows(ids, tag, salts_ptr, scales_ptr, cols, fresh), mask=both)
        if NUM_STATES >= 1:
            if STATE0_PER_ELEMENT:
                tl.store(state0_ptr + cell, tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + init0, mask=both)
            else:
                tl.store(state0_ptr + slot, tl.zeros([BLOCK_R], tl.float32) + init0, mask=fresh)
        if NUM_STATES >= 2:
            if STATE1_PER_ELEMENT:
                tl.store(state1_ptr + cell, tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + init1, mask=both)
            else:
                tl.store(state1_ptr + slot, tl.zeros([BLOCK_R], tl.float32) + init1, mask=fresh)


def triton_init_rows(weights, states, state_init, slots, status, ids, tags, salts, scales) -> None:
    count, dim = ids.numel(), weights.shape[1]
    if count == 0:
        return
    if len(states) > 2:
        raise ValueError(f"at most two optimizer states per row, got {len(states)}")
    padded = list(states) + [weights] * (2 - len(states))
    inits = list(state_init) + [0.0] * (2 - len(state_init))
    block_r, block_d = row_blocks(dim)
    _init_rows_kernel[(triton.cdiv(count, block_r),)](
        weights, padded[0], padded[1], slots, status, ids, tags, salts, scales,
        count, dim, float(inits[0]), float(inits[1]),
        NUM_STATES=len(states),
        STATE0_PER_ELEMENT=len(states) >= 1 and padded[0].dim() == 2,
        STATE1_PER_ELEMENT=len(states) >= 2 and padded[1].dim() == 2,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=ROW_WARPS,
    )


@triton.jit(do_not_specialize=["n"])
def _read_rows_kernel(
    weights_ptr, slots_ptr, index_ptr, ids_ptr, tags_ptr, salts_ptr, scales_ptr, out_ptr, n, dim,
    HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n
    if HAS_INDEX:
        query = tl.load(index_ptr + rows, mask=ok, other=0)
    else:
        query = rows
    slot = tl.load(slots_ptr + query, mask=ok, other=0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = (cols < dim)[None, :]
    out_cell = rows[:, None] * dim + cols[None, :]
    stored = (ok & (slot >= 0))[:, None] & col_ok
    values = tl.load(weights_ptr + slot[:, None] * dim + cols[None, :], mask=stored, other=0.0)
    tl.store(out_ptr + out_cell, values, mask=stored)
    missing = ok & (slot < 0)
    if tl.max(missing.to(tl.int32)) > 0:
        ids = tl.load(ids_ptr + query, mask=missing, other=0)
        tag = tl.load(tags_ptr + query, mask=missing, other=0).to(tl.int64)
        initial = _initial_rows(ids, tag, salts_ptr, scales_ptr, cols, missing)
        tl.store(out_ptr + out_cell, initial, mask=missing[:, None] & col_ok)


def triton_read_rows(weights, slots, ids, tags, salts, scales, index=None) -> torch.Tensor:
    count, dim = (slots if index is None else index).numel(), weights.shape[1]
    out = torch.empty(count, dim, dtype=torch.float32, device=weights.device)
    if count:
        block_r, block_d = row_blocks(dim)
        _read_rows_kernel[(triton.cdiv(count, block_r),)](
            weights, slots, slots if index is None else index, ids, tags, salts, scales, out, count, dim,
            HAS_INDEX=index is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=ROW_WARPS,
        )
    return out
