"""Keyed dropout in Triton: the hash of :mod:`megatron_gr.ops.pytorch.keyed_dropout` in
uint32 arithmetic (the same bits), as ``@triton.jit`` helpers that the fused kernels (STU
output, mHC merge) call on their tiles, and a standalone elementwise kernel.

A tile of ``[BLOCK_T, BLOCK_F]`` elements loads one int64 key per token and hashes it
(two ``mix``), hashes its feature indices once, and spends one ``mix`` per element: no
mask is stored, the backward hashes again.

The three stream words travel as int32 kernel arguments (their bits; ``stream_args``) and
are not specialised on, so a new step or site reuses the compiled kernel. With
``DEVICE_WORDS`` the kernels read them from a ``[3]`` int64 device tensor instead
(``DropoutKeys.words``): a CUDA graph replays its kernels with the arguments of its capture,
so the words of each step must come from memory the graph reads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_gr.ops.pytorch.keyed_dropout import drop_threshold, stream_words


def stream_args(seed: int, site: int, p: float) -> tuple[int, int, int, int]:
    """``(s0, s1, s2, threshold)`` as kernel arguments: the words' bits as int32 values."""
    words = [w - 2**32 if w >= 2**31 else w for w in stream_words(seed, site)]
    return words[0], words[1], words[2], drop_threshold(p)


def kernel_key_args(keys, dropout_p: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple, bool]:
    """What a fused kernel with keyed dropout takes: the token keys, the stream-word tensor,
    ``(feature_offset, s0, s1, s2, threshold)`` and ``DEVICE_WORDS`` (the words read from
    the tensor, not from s0..s2); without dropout placeholders that are never read."""
    if dropout_p > 0.0:
        token_keys = keys.token_keys.contiguous()
        if keys.words is not None:
            return token_keys, keys.words, (keys.feature_offset, 0, 0, 0, drop_threshold(dropout_p)), True
        return token_keys, token_keys, (keys.feature_offset, *stream_args(keys.seed, keys.site, dropout_p)), False
    placeholder = torch.zeros(1, device=device, dtype=torch.int64)
    return placeholder, placeholder, (0, 0, 0, 0, 0), False


@triton.jit
def stream_words_of(Words, s0, s1, s2, DEVICE_WORDS: tl.constexpr):
    """The site's stream words as int32 bits: the arguments, or with ``DEVICE_WORDS`` the
    int64 values in [0, 2^32) at ``Words[0..2]`` (truncated to their 32 bits)."""
    if DEVICE_WORDS:
        s0 = tl.load(Words).to(tl.int32)
        s1 = tl.load(Words + 1).to(tl.int32)
        s2 = tl.load(Words + 2).to(tl.int32)
    return s0, s1, s2


@triton.jit
def mix32(x):
    """lowbias32 of a uint32 tensor."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def row_hashes(Keys, rows, live, s0, s1):
    """``[BLOCK_T]`` uint32 hashes of the tokens ``rows`` (int64 keys read from ``Keys``)."""
    key = tl.load(Keys + rows, mask=live, other=0)
    low = key.to(tl.uint32)
    high = (key >> 32).to(tl.uint32)
    return mix32(mix32(low ^ s0.to(tl.uint32, bitcast=True)) ^ high ^ s1.to(tl.uint32, bitcast=True))


@triton.jit
def column_hashes(features, s2):
    """``[BLOCK_F]`` uint32 hashes of global feature indices ``features``."""
    return mix32(features.to(tl.uint32) ^ s2.to(tl.uint32, bitcast=True))


@triton.jit
def keep_elements(rows_hash, columns_hash, threshold):
    """``[BLOCK_T, BLOCK_F]`` bool: True where an element is kept."""
    hashed = mix32(rows_hash[:, None] ^ columns_hash[None, :])
    return (hashed >> 8) >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["num_tokens", "feature_offset", "s0", "s1", "s2", "threshold"])
def _keyed_dropout_kernel(X, Keys, Words, Y, num_tokens, num_features, feature_offset, s0, s1, s2, threshold,
                          keep_prob, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, DEVICE_WORDS: tl.constexpr):
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    live = rows < num_tokens
    mask = live[:, None] & (cols < num_features)[None, :]
    keep = keep_elements(row_hashes(Keys, rows, live, s0, s1), column_hashes(feature_offset + cols, s2), threshold)
    offs = rows[:, None] * num_features + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, tl.where(keep, x / keep_prob, 0.0).to(Y.dtype.element_ty), mask=mask)


def _apply(x: torch.Tensor, token_keys: torch.Tensor, words: torch.Tensor, args: tuple, device_words: bool,
           p: float) -> torch.Tensor:
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous()
    tokens, features = flat.shape
    out = torch.empty_like(flat)
    block_f = min(triton.next_power_of_2(max(features, 1)), 1024)
    block_t = max(1, min(64, 4096 // block_f))
    if flat.numel():
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(features, block_f))
        _keyed_dropout_kernel[grid](flat, token_keys, words, out, tokens, features, *args, 1.0 - p,
                                    BLOCK_T=block_t, BLOCK_F=block_f, DEVICE_WORDS=device_words, num_warps=4)
    return out.view(x.shape)


class _KeyedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_keys, words, args, device_words, p):
        ctx.save_for_backward(token_keys, words)
        ctx.meta = (args, device_words, p)
        return _apply(x, token_keys, words, args, device_words, p)

    @staticmethod
    def backward(ctx, grad):
        token_keys, words = ctx.saved_tensors
        args, device_words, p = ctx.meta
        return _apply(grad, token_keys, words, args, device_words, p), None, None, None, None, None


def triton_keyed_dropout(x: torch.Tensor, keys, *, p: float) -> torch.Tensor:
    """Same semantics and mask as :func:`megatron_gr.ops.pytorch.keyed_dropout.pytorch_keyed_dropout`."""
    token_keys, words, args, device_words = kernel_key_args(keys, p, x.device)
    return _KeyedDropout.apply(x, token_keys, words, args, device_words, p)
