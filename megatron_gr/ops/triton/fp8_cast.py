"""Fused FP8 cast in Triton, same results as :mod:`megatron_gr.ops.pytorch.fp8_cast`.

One pass over ``x [M, N]`` (any strides): scale, saturate, round to the FP8 grid, store
the row-major result and/or its transpose ``[N, M_pad]`` (padding columns zero), and fold
``max |x|`` into an amax with one atomic per tile. The unfused reference reads and writes
the tensor about five times (fp32 copy, multiply, clamp, cast, transpose).

Rounding is done here in float32 (ties to even) before the conversion, which then only
sees values the format holds exactly: Triton's interpreter (the CPU tests) converts those
exactly but rounds other values wrongly, and the hardware conversion gives the same bits.
Two Triton habits the rounding avoids, both invisible to a float comparison: unary minus
is ``0 - x`` (so ``-(+0.0)`` is ``+0.0``: negative values that round to zero lost their
sign, hundreds per tensor in e4m3), hence the sign goes back as a bit; and on NVIDIA GPUs
a float32 ``/`` compiles to the approximate ``div.full.f32``, up to an ulp off even for a
representable quotient (it would move subnormal ties; the interpreter divides exactly),
hence only multiplications by powers of two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 8

# mantissa bits and the exponent of the smallest normal number of each format
_FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
_SCALE_AXES = {None: 0, 0: 1, 1: 2}


@triton.jit
def _round_to_fp8_grid(
    x, MANT_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, QUANTUM: tl.constexpr, INV_QUANTUM: tl.constexpr
):
    """``x`` (float32, within the format's range) rounded to the nearest FP8 value, ties to
    even, sign kept (``-0.0`` too). Normal numbers keep ``MANT_BITS`` mantissa bits; below
    ``MIN_NORMAL`` values are multiples of ``QUANTUM`` (subnormals). ``INV_QUANTUM = 1 /
    QUANTUM``: a multiplication, never a division (see the module docstring)."""
    shift: tl.constexpr = 23 - MANT_BITS
    bits = x.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # the sign bit alone (0x80000000)
    bits = bits & 2147483647  # |x|
    ax = bits.to(tl.float32, bitcast=True)
    lsb = (bits >> shift) & 1
    bits = (bits + ((1 << (shift - 1)) - 1) + lsb) & (-(1 << shift))
    normal = bits.to(tl.float32, bitcast=True)
    steps = tl.minimum(ax, MIN_NORMAL) * INV_QUANTUM  # exact: a power of two
    whole = tl.floor(steps)
    frac = steps - whole
    odd = (whole.to(tl.int32) & 1) == 1
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    subnormal = (whole + tl.where(up, 1.0, 0.0)) * QUANTUM
    rounded = tl.where(ax < MIN_NORMAL, subnormal, normal)
    # the sign goes back as a bit: Triton's unary minus is ``0 - x``, which turns -0.0 into +0.0
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_cast_kernel(
    X, S, OUT, OUT_T, AMAX, M, N, M_PAD, stride_xm, stride_xn,
    LIMIT: tl.constexpr, MANT_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, QUANTUM: tl.constexpr,
    INV_QUANTUM: tl.constexpr, E5M2: tl.constexpr, SCALE_AXIS: tl.constexpr, WRITE_OUT: tl.constexpr,
    WRITE_T: tl.constexpr, WITH_AMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if SCALE_AXIS == 1:  # one scale per row
        scale = tl.load(S + rows, mask=row_ok, other=0.0)[:, None]
    elif SCALE_AXIS == 2:  # one per column
        scale = tl.load(S + cols, mask=col_ok, other=0.0)[None, :]
    else:
        scale = tl.load(S)
    if WITH_AMAX:
        magnitude = tl.abs(x)
        magnitude = tl.where(magnitude == magnitude, magnitude, float("inf"))  # NaN counts as inf
        tl.atomic_max(AMAX, tl.max(tl.max(magnitude, axis=1), axis=0))
    scaled = tl.minimum(tl.maximum(x * scale, -LIMIT), LIMIT)
    rounded = _round_to_fp8_grid(scaled, MANT_BITS, MIN_NORMAL, QUANTUM, INV_QUANTUM)
    if E5M2:
        q = rounded.to(tl.float8e5)
    else:
        q = rounded.to(tl.float8e4nv)
    if WRITE_OUT:
        tl.store(OUT + rows[:, None] * N + cols[None, :], q, mask=mask)
    if WRITE_T:  # rows M..M_PAD-1 hold zeros (masked loads)
        tl.store(OUT_T + cols[None, :] * M_PAD + rows[:, None], q, mask=(rows < M_PAD)[:, None] & col_ok[None, :])


def triton_fp8_cast(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    scale_axis: Optional[int],
    out: bool,
    transposed: bool,
    pad_to: int,
    amax: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    rows, cols = x.shape
    padded = -(-rows // pad_to) * pad_to if transposed else rows
    data = torch.empty(rows, cols, dtype=dtype, device=x.device) if out else None
    data_t = torch.empty(cols, padded, dtype=dtype, device=x.device) if transposed else None
    if padded == 0 or cols == 0:
        return data, data_t
    mant_bits, min_exp = _FORMATS[dtype]
    grid = (triton.cdiv(padded, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    _fp8_cast_kernel[grid](
        x, scale, data if out else x, data_t if transposed else x, amax if amax is not None else scale,
        rows, cols, padded, x.stride(0), x.stride(1),
        LIMIT=torch.finfo(dtype).max, MANT_BITS=mant_bits, MIN_NORMAL=2.0**min_exp,
        QUANTUM=2.0 ** (min_exp - mant_bits), INV_QUANTUM=2.0 ** (mant_bits - min_exp), E5M2=dtype == torch.float8_e5m2,
        SCALE_AXIS=_SCALE_AXES[scale_axis], WRITE_OUT=out, WRITE_T=transposed, WITH_AMAX=amax is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
    )
    return data, data_t
