"""Reference STU output path: ``dropout(LayerNorm(attn) * u)``, the gated attention output
that feeds the STU layer's output projection."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_gr.ops.pytorch.keyed_dropout import pytorch_keyed_dropout


def pytorch_stu_output(
    attn: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    eps: float,
    dropout_p: float,
    training: bool,
    dropout_keys=None,
) -> torch.Tensor:
    tokens = attn.shape[0]
    attn, u = attn.reshape(tokens, -1), u.reshape(tokens, -1)
    gated = F.layer_norm(attn, (attn.shape[-1],), weight, bias, eps) * u
    if not (training and dropout_p > 0.0):
        return gated
    keys = dropout_keys
    return pytorch_keyed_dropout(
        gated, keys.token_keys, seed=keys.seed, site=keys.site, feature_offset=keys.feature_offset, p=dropout_p,
        words=keys.words,
    )
