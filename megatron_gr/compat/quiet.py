"""Warnings that megatron-core 0.16.1's own code raises on every run, silenced only around
our calls into that code, each by its exact message: nothing we can change causes them,
and a user who sees them on the first lines of every run learns to ignore warnings.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

# DistributedOptimizer.zero_grad reads ``.grad`` of its fp32 shards, which are views of the
# parameters (non-leaf tensors); megatron's source notes it ("throws grad-access warning").
_NON_LEAF_GRAD = r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"

# megatron's gradient and parameter buffers reduce-scatter gradients and all-gather
# weights with the collectives that torch 2.13 deprecates.
_DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
)


def zero_grad(optimizer) -> None:
    """``optimizer.zero_grad()``, without megatron's non-leaf ``.grad`` warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
        optimizer.zero_grad()


@contextlib.contextmanager
def megatron_collective_deprecations_silenced() -> Iterator[None]:
    """Around megatron calls that reduce gradients or gather weights (a training step; the
    weight gather before evaluation): hides torch's deprecation notices for the two
    collectives megatron calls there. Also usable as a decorator."""
    with warnings.catch_warnings():
        for message in _DEPRECATED_COLLECTIVES:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
