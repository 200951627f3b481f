"""Which linear the ranking tower's fusion layers are: ``torch.nn.Linear``, or with
``model.fp8`` the native FP8 linear (``transformer/fp8/replicated_linear.py``).

The tower is replicated on every tensor-parallel rank (it runs on the gathered candidates),
so its FP8 linears are plain ones with no reduction. Under Transformer Engine the STU
layers use TE's linears while the tower keeps the native one: the recipe must then be one
both understand (``delayed`` or ``tensorwise``; ``config/ranking_checks.py`` refuses the
others). The task heads (one output each) and the encoders' MLPs stay in the model's
precision: see docs/guide/fp8.md.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

LinearFactory = Callable[[int, int], torch.nn.Module]


def fusion_linear(config) -> LinearFactory:
    """``(in_features, out_features) -> module`` for the tower's fusion layers under the
    model ``config`` (a ``GRTransformerConfig``)."""
    if config.fp8 is None:
        return torch.nn.Linear
    from megatron_gr.transformer.fp8.replicated_linear import Fp8Linear

    return functools.partial(Fp8Linear, config=config)
