"""``weights[ids]`` for a small weight vector and many ids, with a histogram backward.

Relative attention bias looks up a few hundred weights with millions of bucket ids. The
backward of plain indexing (and even of an embedding) sorts the ids to combine duplicates;
a weighted histogram adds them up directly and is an order of magnitude faster on GPUs.
It is an ``index_add_`` into a zeroed vector, not ``bincount``: on a GPU ``bincount`` reads
the largest id back to the host (a synchronisation in every backward), and on a CPU the two
sum in the same order (bit-identical).
"""

from __future__ import annotations

import torch


class _BucketLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_weights = weights.shape[0]
        ctx.weight_dtype = weights.dtype
        return weights[ids]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        accumulate = torch.promote_types(grad.dtype, torch.float32)
        grad_weights = torch.zeros(ctx.num_weights, dtype=accumulate, device=grad.device)
        grad_weights.index_add_(0, ids.reshape(-1), grad.reshape(-1).to(accumulate))
        return grad_weights.to(ctx.weight_dtype), None


def bucket_lookup(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weights[ids]`` (``weights`` 1-D, ``ids`` int64 of any shape), differentiable in
    ``weights``."""
    return _BucketLookup.apply(weights, ids)
