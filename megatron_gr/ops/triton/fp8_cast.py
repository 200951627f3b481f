"""Fused FP8 cast in Triton, same results as :mod:`megatron_gr.ops.pytorch.fp8_cast`.

One pass over ``x [M, N]`` (any strides): scale, saturate, round to the FP8 grid, store
the row-major result and/or its transpose ``[N, M_pad]`` (padding columns zero), and fold
``max |x|`` into an amax with one atomic per tile. The unfused reference reads and writes
the tensor about five times (fp32 copy, multiply, clamp, cast, transpose).

Rounding is done here in float32 (ties to even), and the FP8 byte is then written from the
rounded value's fields (sign, exponent, mantissa) with integer operations, never by Triton's
float-to-FP8 conversion: its interpreter (the CPU tests) rounds wrongly, and compiled for an
H100 it wrote shuffled or constant bytes for some tile layouts (float32 inputs with ragged or
column-major tiles, and the transposed store of one converted tile; Triton 3.6). Both
layouts are stored from the 32-bit codes, the transpose taken before the narrowing.
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
    LIMIT: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, MIN_NORMAL: tl.constexpr, QUANTUM: tl.constexpr,
    INV_QUANTUM: tl.constexpr, SCALE_AXIS: tl.constexpr, WRITE_OUT: tl.constexpr,
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
    code = _fp8_bits(rounded, MANT_BITS, 1 - MIN_EXP, MIN_NORMAL, INV_QUANTUM)
    if WRITE_OUT:
        tl.store(OUT + rows[:, None] * N + cols[None, :], code.to(tl.uint8), mask=mask)
    if WRITE_T:  # rows M..M_PAD-1 hold zeros (masked loads)
        code_t = tl.trans(code)
        tl.store(OUT_T + cols[:, None] * M_PAD + rows[None, :], code_t.to(tl.uint8),
                 mask=col_ok[:, None] & (rows < M_PAD)[None, :])


@triton.jit
def _fp8_bits(rounded, MANT_BITS: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr, INV_QUANTUM: tl.constexpr):
    """The FP8 byte (in an int32) of ``rounded``, a value the format holds exactly, from its
    float32 fields (see the module docstring); ``BIAS`` is the format's exponent bias."""
    bits = rounded.to(tl.int32, bitcast=True)
    magnitude = bits & 2147483647
    ax = magnitude.to(tl.float32, bitcast=True)
    exponent = (magnitude >> 23) - 127 + BIAS
    normal = (exponent << MANT_BITS) | ((magnitude >> (23 - MANT_BITS)) & ((1 << MANT_BITS) - 1))
    subnormal = (ax * INV_QUANTUM).to(tl.int32)  # exact: the value is a multiple of the quantum
    code = tl.where(ax < MIN_NORMAL, subnormal, normal)
    return code | ((bits >> 24) & 128)  # the sign bit (bit 31) as bit 7


def kernel_constants(dtype: torch.dtype, scale_axis: Optional[int], *, out: bool, transposed: bool, amax: bool) -> dict:
    """The kernel's compile-time arguments for one format and layout."""
    mant_bits, min_exp = _FORMATS[dtype]
    return dict(
        LIMIT=torch.finfo(dtype).max, MANT_BITS=mant_bits, MIN_EXP=min_exp, MIN_NORMAL=2.0**min_exp,
        QUANTUM=2.0 ** (min_exp - mant_bits), INV_QUANTUM=2.0 ** (mant_bits - min_exp),
        SCALE_AXIS=_SCALE_AXES[scale_axis], WRITE_OUT=out, WRITE_T=transposed, WITH_AMAX=amax,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )


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
    grid = (triton.cdiv(padded, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    _fp8_cast_kernel[grid](  # the outputs as bytes: the kernel writes FP8 codes
        x, scale, data.view(torch.uint8) if out else x, data_t.view(torch.uint8) if transposed else x,
        amax if amax is not None else scale, rows, cols, padded, x.stride(0), x.stride(1),
        **kernel_constants(dtype, scale_axis, out=out, transposed=transposed, amax=amax is not None),
        num_warps=NUM_WARPS,
    )
    return data, data_t
