"""Activation recompute through megatron-core's own machinery where its public API stops
short: ``CheckpointWithoutOutput`` driven in an order of our choosing (mHC recompute) and
``TransformerBlock``'s full-layer recompute from a block with its own ``forward``."""

from __future__ import annotations

import torch

from megatron_gr.compat.version import require


def checkpoint_without_output_fp8_arg():
    """``CheckpointWithoutOutput(fp8=False)`` treats any non-None value as "fp8 on" and
    then calls Transformer Engine; pass None unless FP8 is really on."""
    return None


def new_checkpoint_without_output():
    """A megatron ``CheckpointWithoutOutput`` with FP8 off (see
    :func:`checkpoint_without_output_fp8_arg`)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.CheckpointWithoutOutput(fp8=checkpoint_without_output_fp8_arg())


def checkpointed_outputs(checkpoint) -> tuple[torch.Tensor, ...]:
    """The outputs a ``CheckpointWithoutOutput`` holds and refills on replay."""
    return tuple(checkpoint.outputs)


def leave_output_out_of_replay(checkpoint) -> None:
    """Patches (one object): ``checkpoint.outputs``, the tensors megatron's replay refills.
    Emptied, the replay refills none of them: for an output that may be freed before the
    replay runs (a pipeline stage's sent activations), which the op's own backward does not
    need refilled (it keeps the replay's copy)."""
    require(checkpoint, "outputs", purpose="leave an output out of an mHC replay")
    checkpoint.outputs = ()


def replay_checkpoint(checkpoint, grad: torch.Tensor) -> None:
    """Runs megatron's replay of one checkpointed op now (``CheckpointWithoutOutput._recompute``,
    private: the gradient hook ``discard_output_and_register_recompute`` would register,
    which replays each op when its own gradient arrives, too late for ops whose outputs
    other ops saved). The replay restores the op's RNG states and refills the storage of
    the outputs it holds; it also keeps the replayed outputs (they carry the replay's
    autograd graph) for the op's backward: pointed here at the refilled storage, bitwise the
    same values, so each output exists once until then."""
    require(checkpoint, "_recompute", purpose="replay mHC ops in forward order")
    originals, ctx = checkpoint.outputs, checkpoint.ctx
    checkpoint._recompute(grad)
    for original, replayed in zip(originals, ctx.outputs):
        replayed.data = original.data


def checkpointed_block_forward(block, hidden_states: torch.Tensor, **inputs) -> torch.Tensor:
    """megatron's full-layer recompute of a ``TransformerBlock`` (``_checkpointed_forward``,
    private; the block's ``forward`` calls it), for a block subclass whose ``forward`` is its
    own. ``inputs``: ``attention_mask``, ``context``, ``context_mask``, ``rotary_pos_emb``,
    ``attention_bias``, ``packed_seq_params``, ``padding_mask`` as that forward passes them."""
    require(block, "_checkpointed_forward", purpose="recompute full layers of a hyper-connection block")
    return block._checkpointed_forward(hidden_states=hidden_states, use_inner_quantization_context=False, **inputs)
