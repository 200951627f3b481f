"""Keyed dropout: a mask that is a function of what an element IS, not of the order in
which random numbers were drawn. Validates once, then dispatches to the reference or the
Triton kernel.

Element ``(t, f)`` of a ``[T, F]`` activation is kept or dropped as a function of

- ``seed``: the step's dropout seed (the loader derives it from the run seed and the step),
- ``site``: which dropout of the model (embedding, layer l's STU output, ...),
- ``token_keys[t]``: the token's key (the loader's: global sample index within the step's
  global batch x ``max_seq_len`` + position in the sequence),
- ``feature_offset + f``: the feature's global index (a tensor-parallel rank holding
  features ``[k, k + F)`` of a wider activation passes ``feature_offset = k``),

through the counter-based integer hash of :mod:`megatron_gr.ops.pytorch.keyed_dropout`.
The seed and site enter the hash as three 32-bit stream words, computed on the host, or read
from a device tensor (``DropoutKeys.words``: CUDA graphs replay kernels whose host arguments
are fixed at capture, so each step's words are written into a tensor the graph reads).
So micro-batches, data-parallel ranks, sequence-parallel slices and tensor-parallel feature
slices all see their part of one mask, and a recomputed forward draws it again. The
Triton kernels (this op's, and the fused STU output and mHC merge) compute the same bits as
the reference from the keys, without storing a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.pytorch.keyed_dropout import pytorch_keep_mask, pytorch_keyed_dropout


@dataclass(frozen=True)
class DropoutKeys:
    """The keys of one dropout site's mask over ``[T, F]`` activations (see the module
    docstring)."""

    seed: int
    site: int
    token_keys: torch.Tensor  # [T] int64
    feature_offset: int = 0
    # [3] int64 on the activations' device: ``stream_words(seed, site)``, when set read from
    # here instead of computed from ``seed`` (CUDA graphs rewrite it every step); same mask.
    words: Optional[torch.Tensor] = None


def keep_mask(keys: DropoutKeys, num_features: int, *, p: float) -> torch.Tensor:
    """``[T, num_features]`` bool, True where an element is kept (the reference)."""
    _check_p(p)
    check_dropout_keys(keys, num_tokens=keys.token_keys.shape[0], device=keys.token_keys.device)
    return pytorch_keep_mask(
        keys.token_keys, num_features, seed=keys.seed, site=keys.site, feature_offset=keys.feature_offset, p=p,
        words=keys.words,
    )


def keyed_dropout(
    x: torch.Tensor,
    keys: Optional[DropoutKeys],
    *,
    p: float,
    training: bool,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> torch.Tensor:
    """Dropout of ``x`` ``[T, ...]`` (the features of a token flattened) with the keyed mask;
    kept values are scaled by ``1 / (1 - p)``. Identity unless ``training`` and ``p > 0``,
    when ``keys`` must hold one key per token.

    Args:
        x: ``[T, ...]`` activations, any float dtype.
        keys: the site's :class:`DropoutKeys`; may be None when no dropout happens.
        p: drop probability in [0, 1).
        training: dropout only in training.
        kernel: ``pytorch`` or ``triton`` (CUDA, or the interpreter).
    """
    kernel = check_backend(kernel)
    _check_p(p)
    if not (training and p > 0.0):
        return x
    check_dropout_keys(keys, num_tokens=x.shape[0], device=x.device)
    if kernel is KernelBackend.TRITON:
        require_backend(kernel, x.device, what="keyed dropout")
        from megatron_gr.ops.triton.keyed_dropout import triton_keyed_dropout

        return triton_keyed_dropout(x, keys, p=p)
    return pytorch_keyed_dropout(
        x, keys.token_keys, seed=keys.seed, site=keys.site, feature_offset=keys.feature_offset, p=p, words=keys.words
    )


def check_dropout_keys(keys: Optional[DropoutKeys], *, num_tokens: int, device: torch.device) -> None:
    """Raises ValueError unless ``keys`` key ``num_tokens`` tokens on ``device`` (ops that
    drop elements call it when their dropout is active)."""
    if not isinstance(keys, DropoutKeys):
        raise ValueError(
            "dropout in training needs the tokens' DropoutKeys (got None): a batch from the training "
            "loader carries token_keys; layers used on their own key tokens by row (see "
            "megatron_gr/transformer/dropout_sites.py)"
        )
    _check_token_keys(keys, num_tokens, device)


def _check_token_keys(keys: DropoutKeys, num_tokens: int, device: torch.device) -> None:
    token_keys = keys.token_keys
    if token_keys.dim() != 1 or token_keys.shape[0] != num_tokens or token_keys.dtype != torch.int64:
        raise ValueError(
            f"token_keys must be a [{num_tokens}] int64 tensor (one key per token), "
            f"got {token_keys.dtype} {list(token_keys.shape)}"
        )
    if token_keys.device != device:
        raise ValueError(f"token_keys are on {token_keys.device}, the activations on {device}")
    if keys.feature_offset < 0:
        raise ValueError(f"feature_offset={keys.feature_offset} must be >= 0")
    words = keys.words
    if words is not None and (words.shape != (3,) or words.dtype != torch.int64 or words.device != device):
        raise ValueError(
            f"DropoutKeys.words must be a [3] int64 tensor on {device} (the site's stream words), "
            f"got {words.dtype} {list(words.shape)} on {words.device}"
        )


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p={p!r} must be in [0, 1)")
