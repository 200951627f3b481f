"""``MHCRecomputeManager``: drops the hyper-connection intermediates of a block of layers
after its forward and recomputes them, in forward order, when its backward starts.

Per sublayer the hyper-connection ops are the pre op (mappings and aggregate) with the
sublayer's norm, and the merge. Each runs under megatron's ``CheckpointWithoutOutput``: no autograd
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

from typing import Callable

import torch
from megatron.core import tensor_parallel

from megatron_gr.compat import checkpoint_without_output_fp8_arg


class MHCRecomputeManager:
    """One per recompute block and forward pass (micro-batches in flight each need their
    own: the replay closes over this forward's checkpoints)."""

    def __init__(self):
        self._checkpoints: list[tensor_parallel.CheckpointWithoutOutput] = []
        self._finished = False

    def checkpoint(self, function: Callable, *args):
        """``function(*args)`` without keeping its autograd graph; its outputs are freed by
        :meth:`discard_outputs_and_register_recompute` and rebuilt in the backward."""
        if self._finished:
            raise RuntimeError("this MHCRecomputeManager already closed its block: start a new one")
        checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=checkpoint_without_output_fp8_arg())
        outputs = checkpoint.checkpoint(function, *args)
        self._checkpoints.append(checkpoint)
        return outputs

    def discard_outputs_and_register_recompute(self, block_output: torch.Tensor) -> None:
        """Call once after the block's last layer: frees every checkpointed output but
        ``block_output`` (the output of the block's last op) and recomputes them all when
        the gradient of ``block_output`` arrives."""
        self._finished = True
        if not block_output.requires_grad:  # nothing will run backward through the block
            self._checkpoints = []
            return
        for checkpoint in self._checkpoints:
            if any(output is block_output for output in checkpoint.outputs):
                if len(checkpoint.outputs) != 1:
                    raise ValueError(
                        f"the block output must be the only output of the op that computes it, which "
                        f"returned {len(checkpoint.outputs)} tensors"
                    )
                # megatron's replay refills the outputs it holds: not this one, which may be
                # gone by then (see the module docstring) and which no op of the block reads
                checkpoint.outputs = ()
                continue
            for output in checkpoint.outputs:
                output.untyped_storage().resize_(0)
        block_output.register_hook(self._recompute)

    def _recompute(self, grad: torch.Tensor) -> None:
        checkpoints, self._checkpoints = self._checkpoints, []
        for checkpoint in checkpoints:
            originals, ctx = checkpoint.outputs, checkpoint.ctx
            # megatron's replay of one checkpoint (restores RNG states, refills the
            # outputs' storage); driven from here so the order is the forward order.
            checkpoint._recompute(grad)
            # megatron keeps the replayed outputs (they carry the replay's graph) beside the
            # originals it refilled from them until this op's backward: point them at the
            # refilled storage, bitwise the same values, so the block's outputs exist once.
            for original, replayed in zip(originals, ctx.outputs):
                replayed.data = original.data
