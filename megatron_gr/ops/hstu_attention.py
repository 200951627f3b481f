"""Jagged HSTU attention: validates inputs once, then dispatches to one implementation."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.key_layout import KeyLayout
from megatron_gr.ops.pytorch.hstu_attention import pytorch_hstu_attention, pytorch_hstu_attention_backward
from megatron_gr.ops.relative_bias import RelativeBiasInputs

def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    normalizer: str = "max_seq_len",
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_len: int = 0,
    num_targets: Optional[torch.Tensor] = None,
    global_prefix_len: int = 0,
    relative_bias: Optional[RelativeBiasInputs] = None,
    max_len: Optional[int] = None,
    key_layout: Optional[KeyLayout] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> torch.Tensor:
    """SiLU attention over packed sequences.

    Args:
        q, k: ``[T, H, Dqk]`` packed queries and keys.
        v: ``[T, H, Dv]`` packed values.
        offsets: ``[B + 1]`` int64 sequence boundaries into the T tokens.
        max_seq_len: the configured maximum length (the normaliser for ``max_seq_len``).
        alpha: scale of q.k before the SiLU.
        normalizer: ``max_seq_len`` or ``seq_len`` (each sequence's own length).
        causal, max_attn_len, contextual_len, num_targets, global_prefix_len: the mask, see
            :mod:`megatron_gr.ops.attention_mask` (semi-local attention is ``max_attn_len =
            sla_k1`` with ``global_prefix_len = sla_k2``).
        relative_bias: optional learned relative position + time bias, shared by all heads,
            see :mod:`megatron_gr.ops.relative_bias`.
        max_len: the longest sequence of the batch when the caller knows it (saves a device
            synchronisation); computed from ``offsets`` otherwise. Must not be smaller than
            any length.
        key_layout: None: ``offsets`` describe queries and keys alike. Otherwise ``offsets``
            are query segments (parts of sequences: context parallelism), ``k`` and ``v``
            ``[Tk, H, D]`` hold each segment's keys as ``key_layout`` describes, and
            ``num_targets`` counts per segment (its sequence's targets), see
            :class:`~megatron_gr.ops.key_layout.KeyLayout`.
        kernel: ``pytorch`` (reference, any device) or ``triton`` (CUDA; on CPU only under
            the Triton interpreter, ``TRITON_INTERPRET=1``, for tests).

    Returns:
        ``[T, H, Dv]`` in the dtype of ``v``.
    """
    _validate(q, k, v, offsets, normalizer, kernel, num_targets, relative_bias, key_layout)
    args = dict(
        max_seq_len=max_seq_len, alpha=alpha, normalizer=normalizer, causal=causal,
        max_attn_len=max_attn_len, contextual_len=contextual_len, num_targets=num_targets,
        global_prefix_len=global_prefix_len, relative_bias=relative_bias, max_len=max_len,
    )
    if key_layout is not None:
        args["key_layout"] = key_layout
    if kernel == "triton":
        require_backend(kernel, q.device, what="HSTU attention")
        from megatron_gr.ops.triton.hstu_attention import triton_hstu_attention

        return triton_hstu_attention(q, k, v, offsets, **args)
    return pytorch_hstu_attention(q, k, v, offsets, **args)


def hstu_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, **kwargs
) -> tuple:
    """The gradients of :func:`hstu_attention` (same arguments) for ``grad_out``:
    ``(dq, dk, dv, d_position_weights, d_time_weights)``, the last two None without a
    relative bias. For callers that run the forward without autograd and keep only its
    inputs (context parallelism re-gathers the keys instead of keeping them): the Triton
    kernel runs its backward kernels directly, the reference recomputes its forward."""
    kernel = kwargs.pop("kernel", KernelBackend.PYTORCH)
    _validate(
        q, k, v, offsets, kwargs.get("normalizer", "max_seq_len"), kernel, kwargs.get("num_targets"),
        kwargs.get("relative_bias"), kwargs.get("key_layout"),
    )
    if kernel == "triton":
        require_backend(kernel, q.device, what="HSTU attention")
        from megatron_gr.ops.triton.hstu_attention import triton_hstu_attention_backward

        return triton_hstu_attention_backward(grad_out, q, k, v, offsets, **kwargs)
    return pytorch_hstu_attention_backward(grad_out, q, k, v, offsets, **kwargs)


def _validate(q, k, v, offsets, normalizer, kernel, num_targets, relative_bias, key_layout=None) -> None:
    check_backend(kernel)
    if normalizer not in ("max_seq_len", "seq_len"):
        raise ValueError(f"normalizer={normalizer!r}: choose 'max_seq_len' or 'seq_len'")
    same_keys = k.shape == q.shape if key_layout is None else k.shape[1:] == q.shape[1:]
    if q.dim() != 3 or k.dim() != 3 or not same_keys:
        raise ValueError(f"q and k must both be [T, H, Dqk], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[0] != k.shape[0] or v.shape[1] != q.shape[1]:
        raise ValueError(f"v must be [T, H, Dv] with k's T and q's H, got {tuple(v.shape)} for q {tuple(q.shape)}")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be a 1-D int tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    if num_targets is not None and num_targets.shape != (offsets.numel() - 1,):
        raise ValueError(
            f"num_targets must be [B={offsets.numel() - 1}] (one count per sequence), got {tuple(num_targets.shape)}"
        )
    if relative_bias is not None:
        relative_bias.validate(q.shape[0])
    if key_layout is not None:
        key_layout.validate(offsets.numel() - 1, k.shape[0], needs_timestamps=relative_bias is not None)
