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

The words may also come as a ``[3]`` int64 device tensor holding the same values
(``words``: CUDA graphs read each step's words from one); the mask is the same.

Row and column hashes are computed once per token and per feature; each element costs one
``mix``. Here the words live in int64 tensors and no intermediate reaches 2^63 (int64
overflow never happens): a product by a multiplier above 2^31 is split (``_mul32_``). The
``[T, F]`` hashes are computed in place, in row blocks that stay in cache on the CPU.
"""

from __future__ import annotations

import math
from typing import Optional

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


def _mul32_(x: torch.Tensor, multiplier: int, scratch: torch.Tensor) -> None:
    """``x = x * multiplier mod 2^32`` in place, for ``x`` in [0, 2^32): below 2^31 the
    product fits in int64; above, ``x m = x (m - 2^31) + (x mod 2) 2^31 (mod 2^32)``."""
    if multiplier < 2**31:
        x.mul_(multiplier).bitwise_and_(_MASK32)
        return
    torch.bitwise_and(x, 1, out=scratch).bitwise_left_shift_(31)
    x.mul_(multiplier - 2**31).add_(scratch).bitwise_and_(_MASK32)


def _xorshift_(x: torch.Tensor, bits: int, scratch: torch.Tensor) -> None:
    torch.bitwise_right_shift(x, bits, out=scratch)
    x.bitwise_xor_(scratch)


def mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place, of 32-bit words held in an int64 tensor (values in [0, 2^32));
    ``scratch`` is an int64 tensor of ``x``'s shape."""
    _xorshift_(x, 16, scratch)
    _mul32_(x, MIX_MULTIPLIERS[0], scratch)
    _xorshift_(x, 15, scratch)
    _mul32_(x, MIX_MULTIPLIERS[1], scratch)
    _xorshift_(x, 16, scratch)
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of 32-bit words held in an int64 tensor (values in [0, 2^32))."""
    x = x.to(torch.int64, copy=True)
    return mix32_(x, torch.empty_like(x))


def row_hashes(token_keys: torch.Tensor, s0, s1) -> torch.Tensor:
    """``[T]`` int64 keys -> ``[T]`` 32-bit row hashes (int64 tensor); the words are ints or
    0-dim int64 tensors."""
    low, high = token_keys & _MASK32, (token_keys >> 32) & _MASK32
    return mix32(mix32(low ^ s0) ^ high ^ s1)


def column_hashes(num_features: int, feature_offset: int, s2, device: torch.device) -> torch.Tensor:
    features = torch.arange(feature_offset, feature_offset + num_features, dtype=torch.int64, device=device)
    return mix32((features & _MASK32) ^ s2)


def pytorch_keep_mask(
    token_keys: torch.Tensor,
    num_features: int,
    *,
    seed: int,
    site: int,
    feature_offset: int,
    p: float,
    words: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[T, num_features]`` bool: True where an element is kept. ``words``: the site's
    stream words as a ``[3]`` int64 tensor (read without a host synchronisation), else
    computed from ``seed`` and ``site``."""
    s0, s1, s2 = stream_words(seed, site) if words is None else words.unbind(0)
    rows = row_hashes(token_keys.to(torch.int64), s0, s1)
    cols = column_hashes(num_features, feature_offset, s2, token_keys.device).unsqueeze(0)
    # kept: the top 24 bits of the hash >= the threshold, i.e. hash >= threshold << 8
    lowest_kept = drop_threshold(p) << (32 - THRESHOLD_BITS)
    keep = torch.empty(rows.shape[0], num_features, dtype=torch.bool, device=rows.device)
    block = _block_rows(num_features, rows.device)
    hashed = torch.empty(min(block, rows.shape[0]), num_features, dtype=torch.int64, device=rows.device)
    scratch = torch.empty_like(hashed)
    for start in range(0, rows.shape[0], block):
        n = min(block, rows.shape[0] - start)
        h = hashed[:n]
        torch.bitwise_xor(rows[start : start + n].unsqueeze(1), cols, out=h)
        mix32_(h, scratch[:n])
        torch.ge(h, lowest_kept, out=keep[start : start + n])
    return keep


def _block_rows(num_features: int, device: torch.device) -> int:
    """Rows hashed at once: 2^16 elements (1 MiB of int64 work space) on the CPU, where
    the passes then run in cache; elsewhere 2^24 (256 MiB of work space, few launches)."""
    elements = 2**16 if device.type == "cpu" else 2**24
    return max(1, elements // max(num_features, 1))


def pytorch_keyed_dropout(
    x: torch.Tensor,
    token_keys: torch.Tensor,
    *,
    seed: int,
    site: int,
    feature_offset: int,
    p: float,
    words: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x`` ``[T, ...]`` with its per-token features (flattened) dropped by the keyed mask
    and the kept ones scaled by ``1 / (1 - p)``."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    keep = pytorch_keep_mask(
        token_keys, flat.shape[1], seed=seed, site=site, feature_offset=feature_offset, p=p, words=words
    )
    return torch.where(keep, flat / (1.0 - p), torch.zeros((), dtype=flat.dtype, device=flat.device)).view(x.shape)
