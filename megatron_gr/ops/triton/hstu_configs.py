"""Block sizes of the HSTU attention kernels, chosen per head dimension and dtype.

Hard-coded winners of the sweeps in ``tools/benchmarks/hstu_attention.py`` on an H100
(see ``docs/benchmarks/hstu_attention.md``), so no run pays for autotuning. The Triton
interpreter (CPU tests) gets small blocks so that short sequences still cross block
boundaries. :func:`override` lets the benchmark try other configurations.

Backward variants (:data:`BACKWARD_VARIANTS`): ``fused`` (one dk/dv kernel + a dq kernel,
seven products per tile) and ``split`` (dv, dk and dq kernels, eight products, one
accumulator per program); :data:`DEFAULT_BACKWARD_VARIANT` (``auto``: split from head dim
128 up, 16-bit inputs) picks the table used when no override is active.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from megatron_gr.ops.triton.availability import interpreter_enabled


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    """Query rows per tile."""

    block_n: int
    """Key rows per tile."""

    num_warps: int = 4
    num_stages: int = 2

    maxnreg: Optional[int] = None
    """Registers per thread the compiler may use (None: its choice, up to 255). 128 at 8
    warps lets two programs share an SM (65,536 registers), so that one program's SiLU work
    overlaps the other's matrix products; it spills where a program needs more."""

    atomic_dq: bool = False
    """Backward only: add dq from the dk/dv kernel with fp32 atomics (five products per tile)
    instead of a separate dq kernel (seven, deterministic)."""

    dq: Optional["KernelConfig"] = None
    """Backward only: blocks of the separate dq kernel (None: the same as this one)."""

    split_dkdv: bool = False
    """Backward only: compute dv and dk in two launches of the key-block kernel (2 and 3
    products per tile, one [BLOCK_N, D] fp32 accumulator each) instead of one launch holding
    both accumulators (4 products): one product more per tile, half the registers. This
    config's blocks are the dv launch's."""

    dk: Optional["KernelConfig"] = None
    """Backward with ``split_dkdv``: blocks of the dk launch (None: the same as this one)."""

    def __str__(self) -> str:
        """Short form for benchmark logs, e.g. ``dv=32x128/w8/s3 dk=32x128/w8/s2 dq=128x32/w8/s2``."""
        blocks = f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}"
        if self.maxnreg is not None:
            blocks += f"/r{self.maxnreg}"
        if self.split_dkdv:
            text = f"dv={blocks} dk={self.dk or blocks}"
        else:
            text = blocks
        if self.atomic_dq:
            return text + " atomic dq"
        return text + (f" dq={self.dq}" if self.dq is not None else "")


_INTERPRETER = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# head dim (max of Dqk, Dv, rounded up to a power of two) -> config.
_FORWARD = {
    32: KernelConfig(128, 64, num_warps=4, num_stages=3),
    64: KernelConfig(128, 64, num_warps=4, num_stages=3),
    # capped at 128 registers: two programs per SM (a 100-byte spill)
    128: KernelConfig(128, 32, num_warps=8, num_stages=3, maxnreg=128),
    256: KernelConfig(128, 32, num_warps=8, num_stages=3),
}
# The dq kernels keep 128 queries (two warpgroups of 64) and stream 32 or 64 keys; below
# 256 capped at 128 registers (two programs per SM). 32 takes 64's blocks (not timed).
_BACKWARD = {
    32: KernelConfig(64, 128, num_warps=8, num_stages=3, dq=KernelConfig(128, 64, num_warps=8, num_stages=3, maxnreg=128)),
    64: KernelConfig(64, 128, num_warps=8, num_stages=3, dq=KernelConfig(128, 64, num_warps=8, num_stages=3, maxnreg=128)),
    128: KernelConfig(64, 128, num_warps=8, num_stages=3, dq=KernelConfig(128, 32, num_warps=8, num_stages=3, maxnreg=128)),
    256: KernelConfig(64, 64, num_warps=8, num_stages=2, dq=KernelConfig(128, 32, num_warps=8, num_stages=3)),
}
# Split backward: the dv and dk launches keep 128 keys (two warpgroups of 64 rows, one
# [128, D] fp32 accumulator: 128 registers per thread at D = 256) and stream queries; the
# dq kernel keeps 128 queries and streams keys. Blocks from the resource report of
# tools/benchmarks/hstu_kernel_resources.py (--heaviest: every mask and the bias) and the
# H100 sweep (docs/benchmarks/hstu_attention.md).
_SPLIT_128 = KernelConfig(
    64, 128, num_warps=8, num_stages=3, split_dkdv=True,
    dk=KernelConfig(64, 128, num_warps=8, num_stages=2), dq=KernelConfig(128, 64, num_warps=8, num_stages=2),
)
_BACKWARD_SPLIT = {
    32: _SPLIT_128,
    64: _SPLIT_128,
    128: _SPLIT_128,
    256: KernelConfig(
        32, 128, num_warps=8, num_stages=3, split_dkdv=True,
        dk=KernelConfig(32, 128, num_warps=8, num_stages=3), dq=KernelConfig(128, 32, num_warps=8, num_stages=3),
    ),
}
# With the relative bias the 256 dk launch above needs 228 KiB of shared memory (the bias
# tables' loads), over the 227 KiB an H100 program may use: two stages there (196 KiB).
_SPLIT_WITH_BIAS = {256: replace(_BACKWARD_SPLIT[256], dk=KernelConfig(32, 128, num_warps=8, num_stages=2))}
_FP32_FORWARD = KernelConfig(64, 32, num_warps=4, num_stages=2)
_FP32_BACKWARD = KernelConfig(32, 32, num_warps=4, num_stages=2)

BACKWARD_VARIANTS = ("fused", "split")
DEFAULT_BACKWARD_VARIANT = "auto"
"""The backward used when no override is active. ``auto``: ``split`` for 16-bit inputs at
head dim 256, ``fused`` otherwise. On the H100 (bf16, causal, 8k,
docs/benchmarks/hstu_attention.md) split ran 4x256 at 284 TFLOP/s against fused's 200 (both
with 128 x 32 dq blocks); at 4x128 fused with 128 x 32 dq blocks ran 332 against split's
316; below 128 and in float32 split was not timed."""
_SPLIT_FROM_HEAD_DIM = 256

_override: dict = {"forward": None, "backward": None, "backward_variant": None, "uniform_bias_tiles": None}


def uniform_bias_tiles(max_len: int, num_position_buckets: int, cfg: KernelConfig) -> bool:
    """Whether a launch takes the relative bias's uniform-tile path (``hstu_bias_tiles``:
    tiles whose pairs share a position or time bucket read one weight and add one gradient
    sum). By default only where it can pay: when the batch's longest sequence reaches tiles
    past the last position bucket (``max_len > P + 2 x block``); its checks cost registers
    (more spills in the register-capped kernels below head dim 256) that short sequences
    would pay for nothing. ``override(uniform_bias_tiles=...)`` forces it on or off."""
    forced = _override["uniform_bias_tiles"]
    if forced is not None:
        return forced
    return max_len > num_position_buckets + 2 * max(cfg.block_m, cfg.block_n)


def launch_options(cfg: KernelConfig) -> dict:
    """The Triton launch options of ``cfg``."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)


def _head_bucket(dqk: int, dv: int) -> int:
    d = max(dqk, dv, 32)
    return 1 << (d - 1).bit_length()


def forward_config(dqk: int, dv: int, dtype: torch.dtype) -> KernelConfig:
    if _override["forward"] is not None:
        return _override["forward"]
    if interpreter_enabled():
        return _INTERPRETER
    if dtype == torch.float32:
        return _FP32_FORWARD
    return _FORWARD[_head_bucket(dqk, dv)]


def backward_config(dqk: int, dv: int, dtype: torch.dtype, *, has_bias: bool = False) -> KernelConfig:
    """The backward blocks; ``has_bias``: launched with the relative attention bias (which
    needs more shared memory)."""
    if _override["backward"] is not None:
        return _override["backward"]
    variant = _override["backward_variant"] or DEFAULT_BACKWARD_VARIANT
    if variant == "auto":
        sixteen_bit = dtype in (torch.bfloat16, torch.float16)
        variant = "split" if sixteen_bit and _head_bucket(dqk, dv) >= _SPLIT_FROM_HEAD_DIM else "fused"
    split = variant == "split"
    if interpreter_enabled() or dtype == torch.float32:
        base = _INTERPRETER if interpreter_enabled() else _FP32_BACKWARD
        return replace(base, split_dkdv=True) if split else base
    bucket = _head_bucket(dqk, dv)
    if split and has_bias and bucket in _SPLIT_WITH_BIAS:
        return _SPLIT_WITH_BIAS[bucket]
    return (_BACKWARD_SPLIT if split else _BACKWARD)[bucket]


@contextlib.contextmanager
def override(
    *,
    forward: Optional[KernelConfig] = None,
    backward: Optional[KernelConfig] = None,
    backward_variant: Optional[str] = None,
    uniform_bias_tiles: Optional[bool] = None,
) -> Iterator[None]:
    """Use these configs inside the block (benchmarks and tests). ``backward_variant`` (one
    of :data:`BACKWARD_VARIANTS` or ``auto``) picks the per-head-dim table when ``backward``
    is None; ``uniform_bias_tiles`` forces the relative bias's uniform-tile path on or off
    (None: by sequence length, see :func:`uniform_bias_tiles`)."""
    if backward_variant is not None and backward_variant not in ("auto", *BACKWARD_VARIANTS):
        raise ValueError(
            f"backward_variant must be 'auto' or one of {BACKWARD_VARIANTS}, got {backward_variant!r}"
        )
    saved = dict(_override)
    _override.update(
        forward=forward, backward=backward, backward_variant=backward_variant, uniform_bias_tiles=uniform_bias_tiles
    )
    try:
        yield
    finally:
        _override.update(saved)
