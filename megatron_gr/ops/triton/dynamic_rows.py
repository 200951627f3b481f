"""Triton kernels of the hash-table rows, with the signatures of their PyTorch references
(:mod:`megatron_gr.ops.pytorch.dynamic_rows`): filled slots initialised, rows read by slot.

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


@triton.jit(do_not_specialize=["n"])
def _init_rows_kernel(
    weights_ptr, fresh_ptr, slots_ptr, status_ptr, ids_ptr, tags_ptr, salts_ptr, scales_ptr, n, dim,
    HAS_FRESH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n
    status = tl.load(status_ptr + rows, mask=ok, other=0)
    placed = ok & ((status == INSERTED) | (status == REPLACED))
    if tl.max(placed.to(tl.int32)) > 0:
        cols = tl.arange(0, BLOCK_D)
        slot = tl.load(slots_ptr + rows, mask=placed, other=0)
        ids = tl.load(ids_ptr + rows, mask=placed, other=0)
        tag = tl.load(tags_ptr + rows, mask=placed, other=0).to(tl.int64)
        initial = _initial_rows(ids, tag, salts_ptr, scales_ptr, cols, placed)
        tl.store(weights_ptr + slot[:, None] * dim + cols[None, :], initial, mask=placed[:, None] & (cols < dim)[None, :])
        if HAS_FRESH:
            tl.store(fresh_ptr + slot, tl.full([BLOCK_R], 1, tl.uint8), mask=placed)


def triton_init_rows(weights, fresh, slots, status, ids, tags, salts, scales) -> None:
    count, dim = ids.numel(), weights.shape[1]
    if count == 0:
        return
    block_r, block_d = row_blocks(dim)
    _init_rows_kernel[(triton.cdiv(count, block_r),)](
        weights, fresh if fresh is not None else status, slots, status, ids, tags, salts, scales, count, dim,
        HAS_FRESH=fresh is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=ROW_WARPS,
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
