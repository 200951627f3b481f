"""Block sizes of the fused mHC kernels, chosen by hand (no autotuning at run time).

Each op tiles ``block_t`` tokens by ``block_c`` channels (for the mappings: ``block_c``
of the ``n C`` flattened stream values). The GPU choices keep a tile at a few thousand
fp32 values per program of ``num_warps`` warps; ``tools/benchmarks/mhc_ops.py
--candidates`` times a few alternatives through :func:`override`. The Triton interpreter
(CPU tests) gets tiny blocks so that small shapes still cross block boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_gr.ops.triton.availability import interpreter_enabled


@dataclass(frozen=True)
class Blocks:
    block_t: int
    """Tokens per tile (a power of two; >= 16 where the tile feeds a matrix product)."""

    block_c: int
    """Channels (or flattened stream values) per tile, a power of two >= 16."""

    num_warps: int = 4

    num_stages: int = 3
    """Software-pipelining depth of the kernel's loops (Triton's default, 3, unless set)."""

    maxnreg: Optional[int] = None
    """Register cap per thread (None: the compiler's choice); 128 lets two programs of 8
    warps share a multiprocessor."""

    def launch(self) -> dict:
        """The launch options: warps, stages and the register cap."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def label(self) -> str:
        """``64x32/w8/s1/r128``: tile, warps, stages (and the register cap)."""
        cap = f"/r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.block_t}x{self.block_c}/w{self.num_warps}/s{self.num_stages}{cap}"


OPS = ("mappings_fwd", "mappings_bwd", "aggregate_fwd", "aggregate_bwd", "merge_fwd", "merge_bwd", "pre_bwd_gates",
       "merge_pre_fwd", "merge_pre_bwd_gates", "merge_pre_bwd", "merge_contract_fwd", "merge_contract_bwd")

# Register use checked for sm_90 with tools/benchmarks/mhc_kernel_resources.py for n = 2 to 8,
# bf16 and fp32 streams: no spills, except the fused pairs' where noted.
# Stream-wise ops (aggregate, merge): block_c counts 16-bit channels, 32 lanes x 16 bytes,
# so that one warp spans a token's chunk (sums over channels stay within the warp; see
# mhc_tiles.py); 32-bit streams halve it (the same bytes). block_t >= num_warps: fewer token
# rows than warps would leave warps doing duplicate work.
_GPU = {
    "mappings_fwd": Blocks(64, 64, 4),
    "mappings_bwd": Blocks(64, 64, 8),
    "aggregate_fwd": Blocks(4, 256, 4),
    "aggregate_bwd": Blocks(4, 256, 4),
    "merge_fwd": Blocks(4, 256, 4),
    "merge_bwd": Blocks(8, 256, 8),
    # the fused pre op's gates kernel walks the channels of block_t tokens for dh_pre as
    # the aggregate backward does (set by analogy with aggregate_bwd); the op's other
    # kernels are the mappings', the aggregate's and Sinkhorn's, with their blocks.
    "pre_bwd_gates": Blocks(4, 256, 4),
    # The fused merge pairs (mhc_merge_pre.py). The forward walks every channel of block_t
    # tokens holding the n input tiles and feeds each merged tile to a tensor-core product
    # (block_t >= 16; 64 tokens: wgmma), unpipelined. Without dropout Triton keeps the
    # merged tiles in the product's register layout: 252 registers at n = 4 (bf16), 174
    # with the keyed dropout; a cap of 128 (two programs of 8 warps per multiprocessor)
    # spills 668 and 40 bytes, so no cap (the capped tile is a candidate). The backward holds the n input
    # tiles, the n stream gradients, per stream a [WP, block_c] projection-gradient tile
    # across its token tiles and the products' operands (mma.sync fragments): about 240
    # registers whatever the tile, so one program of 8 warps per multiprocessor, its loads
    # pipelined 3 deep (48 KiB of shared memory) to keep enough bytes in flight.
    "merge_pre_fwd": Blocks(64, 32, 8, num_stages=1),
    "merge_pre_bwd_gates": Blocks(4, 256, 4),
    "merge_pre_bwd": Blocks(16, 64, 8),
    "merge_contract_fwd": Blocks(4, 256, 4),
    "merge_contract_bwd": Blocks(8, 256, 8),
}
# More than 4 streams (any dtype): the merge backward holds 2n tiles in registers, so
# half the channels per token row and half the rows.
_GPU_WIDE = {
    "merge_bwd": Blocks(4, 128, 4),
    # the fused pairs spill some registers above 4 streams (correct, slower): unpipelined,
    # a forward pipelined 3 deep would need more shared memory than a multiprocessor has
    "merge_pre_fwd": Blocks(32, 16, 4, num_stages=1),
    "merge_pre_bwd_gates": Blocks(4, 128, 4),
    "merge_pre_bwd": Blocks(16, 16, 8, num_stages=1),
    "merge_contract_fwd": Blocks(4, 128, 4),
    "merge_contract_bwd": Blocks(4, 128, 4),
}
# float32 (and float16) streams take the projection products in tf32x3, which splits
# both operands: smaller tiles (and fewer tokens per backward tile above 4 streams, whose
# projection-gradient tile has 128 rows).
_GPU_FP32_MAPPINGS = {"mappings_fwd": Blocks(64, 32, 4), "mappings_bwd": Blocks(32, 32, 4)}
# float32 streams in the fused pair's backward: tf32x3 products spill a little (136 bytes)
# whatever the tile; unpipelined spills least.
_GPU_FP32_MERGE_PRE = {"merge_pre_bwd": Blocks(16, 32, 8, num_stages=1)}
_GPU_FP32_MAPPINGS_WIDE = {"mappings_bwd": Blocks(16, 32, 4)}
_INTERPRETER = {
    "mappings_fwd": Blocks(16, 16, 1),
    "mappings_bwd": Blocks(16, 16, 1),
    "aggregate_fwd": Blocks(4, 16, 1),
    "aggregate_bwd": Blocks(4, 16, 1),
    "merge_fwd": Blocks(4, 16, 1),
    "merge_bwd": Blocks(4, 16, 1),
    "pre_bwd_gates": Blocks(4, 16, 1),
    "merge_pre_fwd": Blocks(16, 16, 1),
    "merge_pre_bwd_gates": Blocks(4, 16, 1),
    "merge_pre_bwd": Blocks(16, 16, 1),
    "merge_contract_fwd": Blocks(4, 16, 1),
    "merge_contract_bwd": Blocks(4, 16, 1),
}
# Alternatives that tools/benchmarks/mhc_ops.py --candidates times against the defaults
# (16-bit streams, n <= 4), per op: overrides for ``override``.
CANDIDATES = {
    "mappings": [
        dict(mappings_fwd=Blocks(128, 64, 8), mappings_bwd=Blocks(64, 128, 8)),
        dict(mappings_fwd=Blocks(64, 128, 4), mappings_bwd=Blocks(32, 128, 4)),
    ],
    "aggregate": [
        dict(aggregate_fwd=Blocks(8, 256, 4), aggregate_bwd=Blocks(8, 256, 8)),
        dict(aggregate_fwd=Blocks(8, 256, 8), aggregate_bwd=Blocks(4, 512, 4)),
    ],
    "merge": [
        dict(merge_fwd=Blocks(8, 256, 4), merge_bwd=Blocks(4, 256, 4)),
        dict(merge_fwd=Blocks(8, 256, 8), merge_bwd=Blocks(8, 128, 8)),
    ],
    "sinkhorn": [],
    "pre": [
        dict(pre_bwd_gates=Blocks(8, 256, 8)),
        dict(pre_bwd_gates=Blocks(4, 512, 4)),
    ],
    "merge_pre": [
        dict(merge_pre_fwd=Blocks(64, 32, 8, num_stages=1, maxnreg=128)),
        dict(merge_pre_fwd=Blocks(64, 32, 8, num_stages=2), merge_pre_bwd=Blocks(16, 64, 8, num_stages=1)),
        dict(merge_pre_fwd=Blocks(32, 32, 4, num_stages=2), merge_pre_bwd=Blocks(16, 32, 8)),
    ],
    "merge_contract": [
        dict(merge_contract_fwd=Blocks(8, 256, 8), merge_contract_bwd=Blocks(4, 256, 4)),
    ],
}
_override: dict[str, Blocks] = {}


def blocks(op: str, *, streams: int, dtype: torch.dtype) -> Blocks:
    """Blocks of ``op`` for ``streams`` residual streams in ``dtype``."""
    if op in _override:
        return _override[op]
    if interpreter_enabled():
        return _INTERPRETER[op]
    wide = _padded(streams) > 4
    if op.startswith("mappings"):
        if dtype == torch.bfloat16:
            return _GPU[op]
        return (wide and _GPU_FP32_MAPPINGS_WIDE.get(op)) or _GPU_FP32_MAPPINGS[op]
    if wide and op in _GPU_WIDE:
        return _GPU_WIDE[op]
    if dtype.itemsize > 2 and op in _GPU_FP32_MERGE_PRE:
        return _GPU_FP32_MERGE_PRE[op]
    chosen = _GPU[op]
    return chosen if dtype.itemsize <= 2 else dataclasses.replace(chosen, block_c=chosen.block_c // 2)


def gate_block_tokens(streams: int) -> int:
    """Tokens per program of the small mapping-backward kernel on ``[T, n² + 2n]``: a tile
    of about 2048 values (16 in the interpreter)."""
    if interpreter_enabled():
        return 16
    width = max(16, _padded(streams * streams + 2 * streams))
    return max(16, 2048 // width)


def sinkhorn_block_tokens(n: int, *, backward: bool) -> int:
    """Tokens per Sinkhorn program of 4 warps (8 in the interpreter). Forward: a tile of
    about 2048 matrix entries. Backward: one token's matrix per thread up to 4 streams (so
    every sum stays in a thread), half that for 3 streams (its padded tile spreads over
    lanes and needs the registers), 16 tokens above 4 streams."""
    if interpreter_enabled():
        return 8
    padded = _padded(n)
    if not backward:
        return max(1, 2048 // (padded * padded))
    if padded > 4:
        return 16
    return 128 if n == padded else 64


def _padded(size: int) -> int:
    return 1 << (size - 1).bit_length()


@contextlib.contextmanager
def override(**configs: Blocks) -> Iterator[None]:
    """Use these blocks inside the block, e.g. ``override(merge_fwd=Blocks(8, 128, 4))``
    (benchmarks)."""
    unknown = set(configs) - set(OPS)
    if unknown:
        raise ValueError(f"unknown mHC kernel(s) {sorted(unknown)}: choose from {OPS}")
    saved = dict(_override)
    _override.update(configs)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)
