"""Reference keyed dropout: the mask of element ``(t, f)`` is a counter-based hash of its
keys, so any cut of the tokens over micro-batches, ranks or tensor-parallel slices draws
the same mask. The Triton kernels (:mod:`megatron_gr.ops.triton.keyed_dropout`) compute the
same bits.

With 32-bit words (all arithmetic modulo 2^32) and ``mix`` the lowbias32 integer hash
(Chris Wellons' hash-prospector: xorshift 16, multiply 0x7FEB352D, xorshift 15, multiply
0x846CA68B, xorshift 16; a bijection of the 32-bit integers)::

    s0, s1, s2 = words(seed, site)                        on the host, splitmix64
    row[t]     = mix(mix(lo(key[t]) ^ s0) ^ hi(key[t]) ^ s1)    key: the token's int64 key
    col[f]     = mix((feature_offset + f) ^ s2)                 f: the feature's local index
    keep[t, f] = (mix(row[t] ^ col[f]) >> 8) >= round(p 2^24)

Row and column hashes are computed once per token and per feature; each element costs one
``mix``. Here the words live in int64 tensors and every product is split into 16-bit
halves, so no intermediate exceeds 2^49 (int64 overflow never happens).
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
THRESHOLD_BITS = 24  # the top 24 bits of the hash are compared with p


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_words(seed: int, site: int) -> tuple[int, int, int]:
    """The three 32-bit words (as unsigned ints) that key one dropout site of one step."""
    z = _splitmix64(_splitmix64(seed & _MASK64) ^ (site & _MASK64))
    return z & _MASK32, z >> 32, _splitmix64(z) & _MASK32


def drop_threshold(p: float) -> int:
    """An element is dropped when the top 24 bits of its hash are below this."""
    return min(round(p * 2**THRESHOLD_BITS), 2**THRESHOLD_BITS)


def _mul32(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """``x * multiplier mod 2^32`` for ``x`` in [0, 2^32), without int64 overflow."""
    low, high = multiplier & 0xFFFF, multiplier >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of 32-bit words held in an int64 tensor (values in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MULTIPLIERS[1])
    return x ^ (x >> 16)


def row_hashes(token_keys: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """``[T]`` int64 keys -> ``[T]`` 32-bit row hashes (int64 tensor)."""
    low, high = token_keys & _MASK32, (token_keys >> 32) & _MASK32
    return mix32(mix32(low ^ s0) ^ high ^ s1)


def column_hashes(num_features: int, feature_offset: int, s2: int, device: torch.device) -> torch.Tensor:
    features = torch.arange(feature_offset, feature_offset + num_features, dtype=torch.int64, device=device)
    return mix32((features & _MASK32) ^ s2)


def pytorch_keep_mask(
    token_keys: torch.Tensor, num_features: int, *, seed: int, site: int, feature_offset: int, p: float
) -> torch.Tensor:
    """``[T, num_features]`` bool: True where an element is kept."""
    s0, s1, s2 = stream_words(seed, site)
    rows = row_hashes(token_keys.to(torch.int64), s0, s1)
    cols = column_hashes(num_features, feature_offset, s2, token_keys.device)
    hashed = mix32(rows.unsqueeze(1) ^ cols.unsqueeze(0))
    return (hashed >> (32 - THRESHOLD_BITS)) >= drop_threshold(p)


def pytorch_keyed_dropout(
    x: torch.Tensor, token_keys: torch.Tensor, *, seed: int, site: int, feature_offset: int, p: float
) -> torch.Tensor:
    """``x`` ``[T, ...]`` with its per-token features (flattened) dropped by the keyed mask
    and the kept ones scaled by ``1 / (1 - p)``."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    keep = pytorch_keep_mask(token_keys, flat.shape[1], seed=seed, site=site, feature_offset=feature_offset, p=p)
    return torch.where(keep, flat / (1.0 - p), torch.zeros((), dtype=flat.dtype, device=flat.device)).view(x.shape)
