"""Block sizes of the HSTU attention kernels, chosen per head dimension and dtype.

Hard-coded winners of the sweeps in ``tools/benchmarks/hstu_attention.py`` on an H100
(see ``docs/benchmarks/hstu_attention.md``), so no run pays for autotuning. The Triton
interpreter (CPU tests) gets small blocks so that short sequences still cross block
boundaries. :func:`override` lets the benchmark try other configurations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
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

    atomic_dq: bool = False
    """Backward only: add dq from the dk/dv kernel with fp32 atomics (five products per tile)
    instead of a separate dq kernel (seven, deterministic)."""

    dq: Optional["KernelConfig"] = None
    """Backward only: blocks of the separate dq kernel (None: the same as this one)."""


_INTERPRETER = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# head dim (max of Dqk, Dv, rounded up to a power of two) -> config.
_FORWARD = {
    32: KernelConfig(128, 64, num_warps=4, num_stages=3),
    64: KernelConfig(128, 64, num_warps=4, num_stages=3),
    128: KernelConfig(128, 64, num_warps=8, num_stages=3),
    256: KernelConfig(128, 32, num_warps=8, num_stages=3),
}
_BACKWARD = {
    32: KernelConfig(64, 128, num_warps=8, num_stages=2),
    64: KernelConfig(64, 128, num_warps=8, num_stages=2),
    128: KernelConfig(64, 128, num_warps=8, num_stages=2),
    256: KernelConfig(64, 64, num_warps=8, num_stages=2, dq=KernelConfig(64, 32, num_warps=8, num_stages=2)),
}
# With the relative bias the 256 dk/dv blocks above need 232 KiB of shared memory, over the
# H100's 227 KiB (OutOfResources at launch); 32-key blocks need 120 KiB and spill nothing
# (tools/benchmarks/hstu_kernel_resources.py --bias).
_BACKWARD_WITH_BIAS = {256: KernelConfig(64, 32, num_warps=8, num_stages=2, dq=KernelConfig(64, 32, num_warps=8, num_stages=2))}
_FP32_FORWARD = KernelConfig(64, 32, num_warps=4, num_stages=2)
_FP32_BACKWARD = KernelConfig(32, 32, num_warps=4, num_stages=2)

_override: dict[str, Optional[KernelConfig]] = {"forward": None, "backward": None}


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
    if _override["backward"] is not None:
        return _override["backward"]
    if interpreter_enabled():
        return _INTERPRETER
    if dtype == torch.float32:
        return _FP32_BACKWARD
    bucket = _head_bucket(dqk, dv)
    if has_bias and bucket in _BACKWARD_WITH_BIAS:
        return _BACKWARD_WITH_BIAS[bucket]
    return _BACKWARD[bucket]


@contextlib.contextmanager
def override(*, forward: Optional[KernelConfig] = None, backward: Optional[KernelConfig] = None) -> Iterator[None]:
    """Use these configs inside the block (benchmarks and tests)."""
    saved = dict(_override)
    _override.update(forward=forward, backward=backward)
    try:
        yield
    finally:
        _override.update(saved)
