"""The STU layer's projection activation ``U, V, Q, K = split(SiLU(x + b))``: validates once,
then dispatches to the reference or the fused Triton kernel.

``x`` is the UVQK projection's GEMM output without its bias (the linear runs with
``skip_bias_add``): the fused kernel adds the bias, applies the SiLU and writes the four
per-head pieces in one pass, and its backward reads the four gradients where they are and
writes the projection's gradient and the bias gradient in one pass. Unfused, the bias add,
the SiLU, the concatenation of the four gradients, the SiLU backward and the bias-gradient
sum are five passes over the ``[T, heads * (2 dv + 2 dqk)]`` activation.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.pytorch.uvqk_activation import pytorch_uvqk_activation


def uvqk_activation(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    heads: int,
    split_sizes: tuple[int, int, int, int],
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, v, q, k)`` of ``SiLU(x + bias)``.

    Args:
        x: ``[T, N]`` or ``[T, 1, N]`` projection output, ``N = heads * sum(split_sizes)``,
            head-major: head h's columns are ``[u_h v_h q_h k_h]``.
        bias: ``[N]`` in the dtype of ``x``, or None.
        heads: heads in ``x``.
        split_sizes: ``(dv, dv, dqk, dqk)``, the widths of u, v, q, k per head.
        kernel: ``pytorch`` or ``triton``.

    Returns:
        Four ``[T, heads, d]`` tensors in the dtype of ``x``, each its own (not views of one
        activation).
    """
    kernel = check_backend(kernel)
    if (len(split_sizes) != 4 or min(split_sizes) < 1 or split_sizes[0] != split_sizes[1]
            or split_sizes[2] != split_sizes[3]):
        raise ValueError(f"split_sizes must be four positive widths (dv, dv, dqk, dqk), got {split_sizes}")
    width = heads * sum(split_sizes)
    if x.dim() not in (2, 3) or x.shape[-1] != width or (x.dim() == 3 and x.shape[1] != 1):
        raise ValueError(f"x must be [T, {width}] or [T, 1, {width}] ({heads} heads x {sum(split_sizes)}), "
                         f"got {tuple(x.shape)}")
    if bias is not None and (bias.shape != (width,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{width}] in x's dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    x = x.reshape(x.shape[0], width)
    if kernel == "triton":
        require_backend(kernel, x.device, what="UVQK activation")
        from megatron_gr.ops.triton.uvqk_activation import triton_uvqk_activation

        return triton_uvqk_activation(x, bias, heads=heads, split_sizes=tuple(split_sizes))
    return pytorch_uvqk_activation(x, bias, heads=heads, split_sizes=tuple(split_sizes))
