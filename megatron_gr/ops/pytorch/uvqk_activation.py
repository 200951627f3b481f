"""Reference UVQK activation: ``split(SiLU(x + b))`` per head."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def pytorch_uvqk_activation(x: torch.Tensor, bias: Optional[torch.Tensor], *, heads: int, split_sizes: tuple):
    """The SiLU runs per piece: four tensors of their own, not views of one activation (a
    view keeps its base alive, which a recomputation that refills the pieces' storage
    would then hold twice)."""
    pre = (x if bias is None else x + bias).view(x.shape[0], heads, sum(split_sizes))
    return tuple(F.silu(piece) for piece in torch.split(pre, split_sizes, dim=-1))
