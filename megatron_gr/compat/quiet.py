"""Warnings that megatron-core 0.16.1's own code raises in every run (training steps, the
weight gather before evaluation, loading a checkpoint), silenced only around our calls into
that code, each by its exact message: nothing we can change causes them, and a user who
sees them on the first lines of every run learns to ignore warnings.
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


# megatron's dist_checkpointing.load (torch_dist strategy) calls torch's deprecated
# ``load_state_dict`` of torch.distributed.checkpoint, which builds deprecated ShardedTensors.
_DEPRECATED_CHECKPOINT_LOAD = (
    r"`load_state_dict` is deprecated and will be removed in future versions",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
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


def load_distributed_checkpoint(sharded_state_dict: dict, checkpoint_dir: str, **kwargs):
    """megatron's ``dist_checkpointing.load`` (its keyword arguments too, e.g. ``strict``),
    without torch's deprecation notices for the checkpoint API it calls."""
    from megatron.core import dist_checkpointing

    with warnings.catch_warnings():
        for message in _DEPRECATED_CHECKPOINT_LOAD:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        return dist_checkpointing.load(sharded_state_dict, checkpoint_dir, **kwargs)
