"""STU output path ``dropout(LayerNorm(attn) * u)``: validates once, then dispatches to the
reference or the fused Triton kernel (one pass over the rows forward and one backward, the
keyed dropout mask hashed from the token keys instead of stored)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.keyed_dropout import DropoutKeys, check_dropout_keys
from megatron_gr.ops.pytorch.stu_output import pytorch_stu_output

def stu_output(
    attn: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    eps: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_keys: Optional[DropoutKeys] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> torch.Tensor:
    """``dropout(layer_norm(attn) * u)`` per token.

    Args:
        attn: ``[T, ...]`` attention output, e.g. ``[T, H, Dv]``; the layer norm runs over
            all D features of a token.
        u: the gate, same shape as ``attn`` (any strides; a per-head view of the fused
            projection is read without a copy by the Triton kernel).
        weight, bias: ``[D]`` layer-norm affine parameters (``bias`` may be None).
        eps: layer-norm epsilon.
        dropout_p, training: dropout after the gate (active only when training).
        dropout_keys: the keys of the dropout mask (:mod:`megatron_gr.ops.keyed_dropout`),
            one per token; the features are the D columns (``feature_offset`` places them in
            a wider, tensor-parallel activation). Needed when dropout is active; both
            kernels draw the same mask.
        kernel: ``pytorch`` or ``triton``.

    Returns:
        ``[T, D]`` in the dtype of ``attn``.
    """
    kernel = check_backend(kernel)
    if attn.shape != u.shape:
        raise ValueError(f"attn and u must have one shape, got {tuple(attn.shape)} and {tuple(u.shape)}")
    width = math.prod(attn.shape[1:])
    if weight.shape != (width,) or (bias is not None and bias.shape != (width,)):
        raise ValueError(f"layer-norm weight and bias must be [{width}], got {tuple(weight.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if training and dropout_p > 0.0:
        check_dropout_keys(dropout_keys, num_tokens=attn.shape[0], device=attn.device)
    if kernel == "triton":
        require_backend(kernel, attn.device, what="STU output")
        from megatron_gr.ops.triton.stu_output import triton_stu_output

        return triton_stu_output(
            attn, u, weight, bias, eps=eps, dropout_p=dropout_p, training=training, dropout_keys=dropout_keys
        )
    return pytorch_stu_output(
        attn, u, weight, bias, eps=eps, dropout_p=dropout_p, training=training, dropout_keys=dropout_keys
    )
