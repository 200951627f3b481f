"""``MHCRecomputeManager``: drops the hyper-connection intermediates of a block of layers
after its forward and recomputes them, in forward order, when its backward starts.

Per sublayer the hyper-connection ops are the pre op (mappings and aggregate) with the
sublayer's norm, and the merge (or, in a block that fuses them, the previous sublayer's
merge with this pre op and the norm, one op). Each runs under megatron's ``CheckpointWithoutOutput``: no autograd
graph in the forward, only its inputs saved. Their outputs are the inputs of the next ops
(the merge output of one layer is what the next layer reads), so after the block's forward
the manager frees the storage of every output except the block's own, and one gradient
hook on the block output replays all ops in forward order: each replay refills the storage
that later ops saved as input. Gradients are those of the plain run (same ops, same RNG
states); what stays between forward and backward is the block input instead of the
n-stream intermediates of every layer.

The block output is the exception, neither freed nor refilled: it leaves the block and
its reader decides how long it lives. A pipeline stage sends it downstream and frees it
at once, keeping only its autograd graph (megatron's ``deallocate_pipeline_outputs``),
so there may be nothing left to refill; the replay of the op that computed it keeps its
own copy for that op's backward, which runs right after the hook. Holding no reference
to it also lets the last stage free it after the contraction of the streams.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_gr.compat import (
    checkpointed_outputs,
    leave_output_out_of_replay,
    new_checkpoint_without_output,
    replay_checkpoint,
)


class MHCRecomputeManager:
    """One per recompute block and forward pass (micro-batches in flight each need their
    own: the replay closes over this forward's checkpoints)."""

    def __init__(self):
        self._checkpoints: list = []  # megatron CheckpointWithoutOutput objects, forward order
        self._finished = False

    def checkpoint(self, function: Callable, *args):
        """``function(*args)`` without keeping its autograd graph; its outputs are freed by
        :meth:`discard_outputs_and_register_recompute` and rebuilt in the backward."""
        if self._finished:
            raise RuntimeError("this MHCRecomputeManager already closed its block: start a new one")
        checkpoint = new_checkpoint_without_output()
        outputs = checkpoint.checkpoint(function, *args)
        self._checkpoints.append(checkpoint)
        return outputs

    def discard_outputs_and_register_recompute(self, block_output: torch.Tensor, *,
                                               kept: Sequence[torch.Tensor] = ()) -> None:
        """Call once after the block's last layer: frees every checkpointed output but
        ``block_output`` (the output of the block's last op) and the ``kept`` tensors, and
        recomputes them all when the gradient of ``block_output`` arrives.

        ``kept``: outputs that an op of the next recompute block reads, when the block ends
        on a merge left pending for the next block's first sublayer (which runs it): the
        streams and maps of the merge stay, ``block_output`` is the sublayer output it adds
        (computed by no op of this block; its gradient arrives before this block's backward
        needs anything it freed). The replay refills the kept tensors with the same values.
        """
        self._finished = True
        if not block_output.requires_grad:  # nothing will run backward through the block
            self._checkpoints = []
            return
        for checkpoint in self._checkpoints:
            outputs = checkpointed_outputs(checkpoint)
            if any(output is block_output for output in outputs):
                if len(outputs) != 1:
                    raise ValueError(
                        f"the block output must be the only output of the op that computes it, which "
                        f"returned {len(outputs)} tensors"
                    )
                # not refilled by the replay: it may be gone by then (see the module
                # docstring) and no op of the block reads it
                leave_output_out_of_replay(checkpoint)
                continue
            for output in outputs:
                if not any(output is tensor for tensor in kept):
                    output.untyped_storage().resize_(0)
        block_output.register_hook(self._recompute)

    def _recompute(self, grad: torch.Tensor) -> None:
        checkpoints, self._checkpoints = self._checkpoints, []
        for checkpoint in checkpoints:  # in forward order: each replay refills what later ops read
            replay_checkpoint(checkpoint, grad)
