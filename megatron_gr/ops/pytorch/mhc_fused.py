"""Reference of the fused mHC pairs: each is the composition of the reference ops of
:mod:`megatron_gr.ops.pytorch.mhc` it fuses, nothing else (one reference per op; the same
numbers as running them one after the other).

    merge_pre:       x' = merge(x, ...);  (u, H_post', H_res') = pre(x', next maps)
    expand_pre:      pre(input_expand(x, n))               x: the block input [T, C]
    merge_contract:  output_contract(merge(x, ...))

In ``merge_pre`` and ``merge_contract`` x is ``[T, n, C]``, or the block input ``[T, C]``
standing for its n copies (``input_expand`` first; n from ``h_res``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.pytorch.mhc import (
    pytorch_input_expand,
    pytorch_mhc_merge,
    pytorch_mhc_pre,
    pytorch_output_contract,
)


def _streams(x: torch.Tensor, n: int) -> torch.Tensor:
    return pytorch_input_expand(x, n) if x.dim() == 2 else x


def pytorch_mhc_merge_pre(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    projection: torch.Tensor,
    alpha: torch.Tensor,
    map_bias: torch.Tensor,
    *,
    iterations: int,
    eps: float,
    dropout_p: float,
    training: bool,
    dropout_keys=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    merged = pytorch_mhc_merge(_streams(x, h_res.shape[1]), h_res, h_post, y, bias, dropout_p=dropout_p,
                               training=training, dropout_keys=dropout_keys)
    return (merged, *pytorch_mhc_pre(merged, projection, alpha, map_bias, iterations=iterations, eps=eps))


def pytorch_mhc_expand_pre(
    x: torch.Tensor,
    projection: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    num_streams: int,
    iterations: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pytorch_mhc_pre(pytorch_input_expand(x, num_streams), projection, alpha, bias, iterations=iterations,
                           eps=eps)


def pytorch_mhc_merge_contract(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    dropout_p: float,
    training: bool,
    dropout_keys=None,
) -> torch.Tensor:
    merged = pytorch_mhc_merge(_streams(x, h_res.shape[1]), h_res, h_post, y, bias, dropout_p=dropout_p,
                               training=training, dropout_keys=dropout_keys)
    return pytorch_output_contract(merged)
