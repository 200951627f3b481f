"""The residual streams between two hyper-connected sublayers, in the form the fused mHC ops
take them.

A block that fuses (``HyperConnectionTransformerBlock(fuse_merges=True)``, the default on
the Triton backend) hands its layers one of three things instead of the merged streams:

- :class:`BlockInput`: the first stage's input ``[s, b, C]``: the first sublayer's pre op
  reads it without making its n copies (``mhc_expand_pre``); the first merge, run alone
  (without ``mhc_fuse_merge_pre``), makes them (:func:`materialize`);
- :class:`PendingMerge`: a sublayer's output with the maps of its merge, the merge not yet
  run: the next sublayer runs it (alone, or inside its pre op, ``mhc_merge_pre``, with
  ``mhc_fuse_merge_pre``), the block's last sublayer inside the contraction of the streams
  (``mhc_merge_contract``);
- the streams ``[s, b, n C]``: at a pipeline stage's end, where the merge runs alone
  (:func:`materialize`: the stage sends the merged streams).

Each step runs through ``run`` (the block's :class:`MHCRecomputeManager` checkpoint, or a
plain call), as the separate ops do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.transformer.hyper_connection import HyperConnectionModule, contract_streams, expand_streams


@dataclass
class BlockInput:
    """The block input ``[s, b, C]`` standing for its ``num_streams`` residual streams."""

    hidden: torch.Tensor
    num_streams: int


@dataclass
class PendingMerge:
    """A sublayer's output and the maps of its merge into the streams, not yet merged."""

    connection: HyperConnectionModule
    """The sublayer's hyper-connection (its kernel backend and training flag run the merge)."""

    streams: torch.Tensor
    """``[s, b, n C]`` the streams that entered the sublayer, or the block input ``[s, b, C]``
    standing for them."""

    h_res: torch.Tensor
    h_post: torch.Tensor
    output: torch.Tensor
    """The sublayer output ``[s, b, C]``."""

    bias: Optional[torch.Tensor]
    dropout_p: float
    dropout_keys: Optional[DropoutKeys] = None
    """The merge's keyed dropout mask (drawn when the sublayer ran: whichever op runs the
    merge, and a recompute replay of it, drops the same elements)."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The merge's tensor inputs, as a checkpointed op takes them."""
        return self.streams, self.h_res, self.h_post, self.output


Streams = Union[torch.Tensor, BlockInput, PendingMerge]
Run = Callable  # run(function, *tensors): a recompute checkpoint or a plain call


def token_count(state: Streams) -> tuple[int, torch.device]:
    """``(s b, device)``: how many tokens the streams hold, in any of their forms."""
    tensor = state.hidden if isinstance(state, BlockInput) else state.output if isinstance(state, PendingMerge) else state
    s, b, _ = tensor.shape
    return s * b, tensor.device


def materialize(state: Streams, run: Run) -> torch.Tensor:
    """The streams ``[s, b, n C]`` as a tensor: a pending merge runs alone, the block input
    is copied n times."""
    if isinstance(state, BlockInput):
        return expand_streams(state.hidden, state.num_streams)
    if not isinstance(state, PendingMerge):
        return state
    pending = state

    def merge(streams, h_res, h_post, output):
        if streams.shape[-1] == output.shape[-1]:  # the block input, one sublayer into the block
            streams = expand_streams(streams, pending.connection.num_streams)
        return pending.connection.merge(streams, h_res, h_post, output, pending.bias, dropout_p=pending.dropout_p,
                                        dropout_keys=pending.dropout_keys)

    return run(merge, *pending.tensors())


def contract(state: Streams, run: Run, *, num_streams: int) -> torch.Tensor:
    """The block output ``[s, b, C]``, the mean of the ``num_streams`` streams: a pending
    merge and the mean run as one op."""
    if not isinstance(state, PendingMerge):
        return contract_streams(materialize(state, run), num_streams)
    pending = state

    def merge_contract(streams, h_res, h_post, output):
        return pending.connection.merge_contract(streams, h_res, h_post, output, pending.bias,
                                                 dropout_p=pending.dropout_p, dropout_keys=pending.dropout_keys)

    return run(merge_contract, *pending.tensors())

