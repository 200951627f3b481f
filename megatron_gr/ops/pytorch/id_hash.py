"""Hashes of raw int64 ids: routing keys, owner ranks, buckets and initial row values.

Everything here is integer arithmetic on int64 tensors (multiplication wraps modulo 2^64,
as it does in CUDA and Triton), so the CPU, the GPU and the Triton kernels agree bit for bit.
The mixer is the splitmix64 finaliser, a bijection of 64-bit words.

Layout of a routing key ``s = mix64(id + tag * GOLDEN)`` (tag: the logical table inside a
coalesced physical table, 0 otherwise)::

    bits 63..32  -> bucket on the owner rank  (monotone in s: sorting by s groups buckets)
    bits 31..0   -> owner rank
"""

from __future__ import annotations

import torch

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
# Initial values are odd multiples of 2^-24 in (-1, 1), times a scale: exact in float32.
INIT_BITS = 24


def as_int64(value: int) -> int:
    """A 64-bit word as the signed int64 that holds the same bits."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64_int(value: int) -> int:
    """splitmix64's finaliser on a Python int (the same bits as :func:`mix64`)."""
    z = value & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return as_int64(z ^ (z >> 31))


def row_salt(seed: int) -> int:
    """Per-table constant mixed into every id of a table with this seed."""
    return mix64_int(seed + GOLDEN)


def init_scale(init_std: float) -> float:
    """Multiplier of the integer draws: uniform on [-sqrt(3) std, sqrt(3) std] has standard
    deviation ``std``. Rounded to float32 here so every backend multiplies by the same number."""
    return float(torch.tensor(init_std * 3.0**0.5 / 2**INIT_BITS, dtype=torch.float32))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on int64 (a bijection)."""
    x = x ^ _shr(x, 30)
    x = x * as_int64(MIX1)
    x = x ^ _shr(x, 27)
    x = x * as_int64(MIX2)
    return x ^ _shr(x, 31)


def routing_keys(ids: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
    """``s`` of every id (int64). With ``tags`` (int, same shape) ids of different logical
    tables get independent keys; a key can still collide across tags, so lookups compare
    (id, tag) pairs, never keys alone."""
    if tags is None:
        return mix64(ids)
    return mix64(ids + tags.to(torch.int64) * as_int64(GOLDEN))


def owner_ranks(keys: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank in ``[0, world_size)`` that owns each key (from the low 32 bits)."""
    return ((keys & 0xFFFFFFFF) * world_size) >> 32


def bucket_ids(keys: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket in ``[0, num_buckets)`` of each key (from the high 32 bits), non-decreasing in
    the signed value of the key."""
    if not 1 <= num_buckets < 2**31:
        raise ValueError(f"num_buckets={num_buckets} must be in [1, 2^31)")
    return (((keys >> 32) + 2**31) * num_buckets) >> 32


def initial_values(ids: torch.Tensor, salts: torch.Tensor, scales: torch.Tensor, dim: int) -> torch.Tensor:
    """Initial rows ``[N, dim]`` float32 of ``ids`` ``[N]``: a function of (table seed, id,
    column) only. ``salts`` ``[N]`` int64 (:func:`row_salt` of each id's table) and
    ``scales`` ``[N]`` float32 (:func:`init_scale` of its table)."""
    rows = mix64(ids ^ salts)  # [N]
    columns = (torch.arange(dim, device=ids.device, dtype=torch.int64) + 1) * as_int64(GOLDEN)  # [D]
    bits = _shr(mix64(rows[:, None] + columns[None, :]), 64 - INIT_BITS)  # [N, D] in [0, 2^24)
    odd = bits * 2 + (1 - 2**INIT_BITS)  # odd integers in (-2^24, 2^24)
    return odd.to(torch.float32) * scales.to(torch.float32)[:, None]
