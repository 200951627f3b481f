"""Block sizes of the fused mHC kernels, chosen by hand (no autotuning at run time).

Each op tiles ``block_t`` tokens by ``block_c`` channels (for the mappings: ``block_c``
of the ``n C`` flattened stream values). The GPU choices keep a tile at a few thousand
fp32 values per program of ``num_warps`` warps; ``tools/benchmarks/mhc_ops.py
--candidates`` times a few alternatives through :func:`override`. The Triton interpreter
(CPU tests) gets tiny blocks so that small shapes still cross block boundaries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from megatron_gr.ops.triton.availability import interpreter_enabled


@dataclass(frozen=True)
class Blocks:
    block_t: int
    """Tokens per tile (a power of two; >= 16 where the tile feeds a matrix product)."""

    block_c: int
    """Channels (or flattened stream values) per tile, a power of two >= 16."""

    num_warps: int = 4


OPS = ("mappings_fwd", "mappings_bwd", "aggregate_fwd", "aggregate_bwd", "merge_fwd", "merge_bwd")

_GPU = {
    "mappings_fwd": Blocks(64, 64, 4),
    "mappings_bwd": Blocks(64, 128, 4),
    "aggregate_fwd": Blocks(4, 256, 4),
    "aggregate_bwd": Blocks(4, 256, 4),
    "merge_fwd": Blocks(4, 256, 4),
    "merge_bwd": Blocks(4, 256, 4),
}
_INTERPRETER = {
    "mappings_fwd": Blocks(16, 16, 1),
    "mappings_bwd": Blocks(16, 16, 1),
    "aggregate_fwd": Blocks(4, 16, 1),
    "aggregate_bwd": Blocks(4, 16, 1),
    "merge_fwd": Blocks(4, 16, 1),
    "merge_bwd": Blocks(4, 16, 1),
}
_override: dict[str, Blocks] = {}


def blocks(op: str) -> Blocks:
    if op in _override:
        return _override[op]
    return (_INTERPRETER if interpreter_enabled() else _GPU)[op]


def sinkhorn_block_tokens(n: int, *, backward: bool) -> int:
    """Tokens per Sinkhorn program: a tile of about 2048 (forward) or 1024 (backward, more
    live tiles) matrix entries; 8 in the interpreter."""
    if interpreter_enabled():
        return 8
    padded = 1 << (n - 1).bit_length()
    return max(1, (1024 if backward else 2048) // (padded * padded))


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
