"""Reference row-sparse optimizer updates (vectorised PyTorch, any device).

Only the rows given are read and written: a row's state moves only when the row receives a
gradient (as torch's ``SparseAdam`` and the fused table optimizers of FBGEMM and
dynamicemb do). Formulas, with ``g`` the gradient times ``grad_scale``:

- ``sgd``: ``w -= lr g``
- ``adagrad``: ``s += g^2``; ``w -= lr g / (sqrt(s) + eps)`` (as ``torch.optim.Adagrad``)
- ``rowwise_adagrad``: ``s += mean_j g_j^2`` (one number per row); ``w -= lr g / (sqrt(s) + eps)``
- ``adam``: ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
  ``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` (as ``torch.optim.Adam``),
  ``t`` the table's step count
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

# State tensors of each optimizer, in the order callers pass them, and their shape per row.
OPTIMIZER_STATES = {
    "sgd": (),
    "adagrad": (("sum", "row"),),
    "rowwise_adagrad": (("sum", "scalar"),),
    "adam": (("exp_avg", "row"), ("exp_avg_sq", "row")),
}


def pytorch_sparse_update(
    weights: torch.Tensor,
    states: list[torch.Tensor],
    slots: torch.Tensor,
    grads: torch.Tensor,
    *,
    optimizer: str,
    lr: float,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: Union[float, torch.Tensor],
    skip: Optional[torch.Tensor] = None,
    fresh: Optional[torch.Tensor] = None,
    state_init: Sequence[float] = (),
) -> None:
    """Updates rows ``slots`` ``[R]`` (distinct; entries < 0 are skipped) of ``weights``
    ``[C, D]`` and ``states`` in place from ``grads`` ``[R, D]``. Rows flagged in ``fresh``
    ``[C]`` start from ``state_init`` (their flag is cleared). A nonzero 0-dim ``skip``
    writes nothing: the update's rows are all dropped (the flag is not read on the host; the
    row selection here is, as everywhere in this reference)."""
    keep = slots >= 0
    if skip is not None:
        keep = keep & (skip == 0)
    slots = slots[keep]
    g = grads[keep].to(torch.float32) * grad_scale
    w = weights[slots]
    old = [state[slots] for state in states]
    if fresh is not None:
        new = fresh[slots].bool()
        old = [torch.where(new.view(-1, *[1] * (value.dim() - 1)), init, value) for value, init in zip(old, state_init)]
        fresh.index_fill_(0, slots, 0)
    if optimizer == "sgd":
        w = w - lr * g
    elif optimizer == "adagrad":
        (total,) = states
        s = old[0] + g * g
        total[slots] = s
        w = w - lr * g / (s.sqrt() + eps)
    elif optimizer == "rowwise_adagrad":
        (total,) = states
        s = old[0] + (g * g).mean(dim=1)
        total[slots] = s
        w = w - lr * g / (s.sqrt() + eps)[:, None]
    elif optimizer == "adam":
        exp_avg, exp_avg_sq = states
        m = old[0] * beta1 + g * (1 - beta1)
        v = old[1] * beta2 + g * g * (1 - beta2)
        exp_avg[slots] = m
        exp_avg_sq[slots] = v
        step_size = lr / (1 - beta1**step)
        denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
        w = w - step_size * m / denom
    else:
        raise ValueError(f"unknown sparse optimizer {optimizer!r}; expected one of {tuple(OPTIMIZER_STATES)}")
    weights[slots] = w
