"""Row-sparse optimizer updates of hash-table rows, dispatched to the PyTorch reference
(:mod:`megatron_gr.ops.pytorch.sparse_optimizers`, which states the formulas) or the fused
Triton kernel."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.pytorch.sparse_optimizers import OPTIMIZER_STATES, pytorch_sparse_update



def sparse_update(
    weights: torch.Tensor,
    states: list[torch.Tensor],
    slots: torch.Tensor,
    grads: torch.Tensor,
    *,
    optimizer: str,
    lr: float,
    step: int,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    grad_scale: Union[float, torch.Tensor] = 1.0,
    skip: Optional[torch.Tensor] = None,
    fresh: Optional[torch.Tensor] = None,
    state_init: Sequence[float] = (),
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> None:
    """Updates rows ``slots`` ``[R]`` (distinct; < 0 = skip) of ``weights`` ``[C, D]`` and
    ``states`` in place with ``grads`` ``[R, D]`` times ``grad_scale`` (a number or a 0-dim
    float32 tensor on the weights' device); ``step`` >= 1 is the step count Adam's bias
    correction uses. ``skip`` (optional 0-dim tensor there): where it is nonzero nothing
    is written (weights, states, fresh flags), decided on the device without a host read.

    ``fresh`` ``[C]`` uint8 (optional): rows whose flag is set start from ``state_init``
    (one value per state tensor) instead of their stored state, which is not read, and the
    update clears their flag. A table flags the rows it creates instead of writing their
    initial state: most rows of a step are new, and each would otherwise cost a write and a
    read of every state row."""
    kernel = check_backend(kernel)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown sparse optimizer {optimizer!r}; expected one of {tuple(OPTIMIZER_STATES)}")
    if len(states) != len(OPTIMIZER_STATES[optimizer]):
        raise ValueError(f"{optimizer} keeps {len(OPTIMIZER_STATES[optimizer])} state tensors, got {len(states)}")
    if grads.shape != (slots.numel(), weights.shape[1]):
        raise ValueError(f"grads must be [{slots.numel()}, {weights.shape[1]}], got {tuple(grads.shape)}")
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    if fresh is not None and (fresh.dtype != torch.uint8 or fresh.shape != (weights.shape[0],) or len(state_init) != len(states)):
        raise ValueError(
            f"fresh must be uint8 [{weights.shape[0]}] with one state_init value per state tensor ({len(states)}), "
            f"got {fresh.dtype} {tuple(fresh.shape)} and {len(state_init)} values"
        )
    for name, value in (("grad_scale", grad_scale), ("skip", skip)):
        if torch.is_tensor(value) and (value.shape != () or value.device != weights.device):
            raise ValueError(f"{name} must be a number or a 0-dim tensor on {weights.device}, got {tuple(value.shape)} on {value.device}")
    options = dict(
        optimizer=optimizer, lr=lr, step=step, beta1=beta1, beta2=beta2, eps=eps, grad_scale=grad_scale, skip=skip,
        fresh=fresh, state_init=list(state_init),
    )
    if kernel == "triton":
        require_backend(kernel, weights.device, what="sparse optimizer")
        from megatron_gr.ops.triton.sparse_optimizers import triton_sparse_update

        return triton_sparse_update(weights, states, slots, grads, **options)
    return pytorch_sparse_update(weights, states, slots, grads, **options)
