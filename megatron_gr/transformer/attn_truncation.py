"""Attention truncation (ULTRA-HSTU): after ``split_layer`` layers only the last
``tail_len`` history tokens of each sequence go on; the ``contextual_len`` tokens at the
start and the ``num_targets`` candidates at the end always stay. The jagged batch is
re-packed once per micro-batch. With contextual_len 1, tail_len 2::

    tokens    [c h h h h k k | c h k]        offsets [0, 7, 10]   num_targets [2, 1]
    kept      [c     h h k k | c h k]        offsets [0, 5, 8]    keep [0 3 4 5 6 7 8 9]

Positions (offsets), timestamps and the tokens' dropout keys (``token_keys``, so a kept
token draws the same masks on every layout) follow the kept tokens; the
layers after the split read the re-packed :class:`JaggedSeqParams`. Under sequence
parallelism the tokens are gathered, truncated and split again (the token split of the
truncated batch); with hyper-connections the token rows carry all n streams, which are
truncated alike.

The plan rides in ``JaggedSeqParams.cache`` so that megatron's block hands it to every
layer; :func:`layer_input` is the layers' hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.sequence_parallel import TokenSplit

CACHE_KEY = "attn_truncation"


def kept_tokens(
    offsets: torch.Tensor, num_targets: torch.Tensor, *, contextual_len: int, tail_len: int,
    num_tokens: Optional[int] = None,
) -> torch.Tensor:
    """``[T]`` bool: the tokens that stay (contextual, the last ``tail_len`` history tokens,
    the candidates) of the sequences ``offsets`` ``[B + 1]`` with ``num_targets`` ``[B]``.
    ``num_tokens``: T when the caller knows it (no device sync; traceable by torch.export)."""
    lengths = offsets[1:] - offsets[:-1]
    if num_tokens is None:
        num_tokens = int(offsets[-1])
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_tokens)
    position = torch.arange(num_tokens, device=offsets.device) - offsets[:-1][owner]
    history_end = (lengths - num_targets)[owner]  # first candidate
    return (position < contextual_len) | (position >= torch.clamp(history_end - tail_len, min=contextual_len))


def truncated_lengths(lengths, num_targets, *, contextual_len: int, tail_len: int):
    """Tokens per sequence after truncation (tensors or numpy arrays alike)."""
    history = lengths - num_targets - contextual_len
    return lengths - history + history.clip(max=tail_len)


def kept_positions(
    offsets: torch.Tensor, new_offsets: torch.Tensor, *, contextual_len: int, num_kept: int
) -> torch.Tensor:
    """``[num_kept]`` int64: the positions in the batch of the tokens that stay, in order, from
    the offsets before and after truncation alone (no device read). A sequence keeps its
    first ``contextual_len`` tokens and its last ``new length - contextual_len``: the
    dropped history tokens are one run right after the contextual ones."""
    new_lengths = new_offsets[1:] - new_offsets[:-1]
    dropped = (offsets[1:] - offsets[:-1]) - new_lengths
    owner = torch.repeat_interleave(
        torch.arange(new_lengths.numel(), device=offsets.device), new_lengths, output_size=num_kept
    )
    position = torch.arange(num_kept, device=offsets.device) - new_offsets[:-1][owner]
    skip = torch.where(position >= contextual_len, dropped[owner], torch.zeros_like(position))
    return offsets[:-1][owner] + position + skip


def kept_count(lengths, num_targets, *, contextual_len: int, tail_len: int) -> int:
    """Tokens after truncation of sequences of ``lengths`` with ``num_targets`` candidates
    (numpy arrays on the host: the loader's count, read by :func:`plan_truncation`)."""
    return int(truncated_lengths(lengths, num_targets, contextual_len=contextual_len, tail_len=tail_len).sum())


@dataclass
class TruncationPlan:
    split_layer: int
    """Layers ``1..split_layer`` see every token; later layers the kept ones."""
    keep: torch.Tensor
    """``[T']`` int64: the kept tokens' positions in the batch."""
    new_position: torch.Tensor
    """``[T]`` int64: each token's position after truncation (-1: dropped)."""
    before: TokenSplit
    after: TokenSplit
    params: JaggedSeqParams
    """The re-packed batch's metadata (padded as ``after`` pads)."""

    def truncate(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's ``[T_local, 1, W]`` rows before -> after truncation (every stream)."""
        return self.after.scatter(self.before.gather(hidden).index_select(0, self.keep))


def plan_truncation(
    params: JaggedSeqParams,
    before: TokenSplit,
    *,
    contextual_len: int,
    tail_len: int,
    split_layer: int,
    max_targets: int,
    num_kept: Optional[int] = None,
) -> TruncationPlan:
    """The truncation of the batch whose (unpadded) tokens ``before`` splits; ``params`` its
    metadata, whose offsets, timestamps and token keys may carry ``before``'s padding
    sequence at the end (it is dropped: ``after`` pads anew). ``max_targets``: the most
    candidates of a sequence (a host int, so the new longest length needs no sync).
    ``num_kept``: the tokens after truncation when the caller knows it (a host int, so the
    kept positions are built without reading the device); None: counted from the mask."""
    num_sequences = params.num_targets.numel() - (1 if before.padding else 0)
    offsets = params.offsets[: num_sequences + 1]
    num_targets = params.num_targets[:num_sequences]
    lengths = truncated_lengths(offsets[1:] - offsets[:-1], num_targets, contextual_len=contextual_len, tail_len=tail_len)
    new_offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
    if num_kept is None:
        keep_mask = kept_tokens(offsets, num_targets, contextual_len=contextual_len, tail_len=tail_len,
                                num_tokens=before.num_tokens)
        keep = torch.nonzero(keep_mask).squeeze(1)
    else:
        keep = kept_positions(offsets, new_offsets, contextual_len=contextual_len, num_kept=num_kept)
    new_position = torch.full((before.num_tokens,), -1, dtype=torch.int64, device=keep.device)
    new_position[keep] = torch.arange(keep.numel(), device=keep.device)
    after = TokenSplit.for_tokens(keep.numel(), before.group)
    real = lambda values: None if values is None else values[: before.num_tokens][keep]  # noqa: E731
    new_params = after.seq_params(
        new_offsets,
        min(params.max_len, contextual_len + tail_len + max_targets),
        timestamps=real(params.timestamps),
        num_targets=num_targets,
        token_keys=real(params.token_keys),
        dropout_seed=params.dropout_seed,
    )
    return TruncationPlan(split_layer, keep, new_position, before, after, new_params)


def attach(params: JaggedSeqParams, plan: Optional[TruncationPlan]) -> JaggedSeqParams:
    if plan is not None:
        params.cache[CACHE_KEY] = plan
    return params


def truncates_input(layer_number: int, params: JaggedSeqParams) -> bool:
    """Whether layer ``layer_number`` (global, 1-based) re-packs its input rows (the layer
    after the split)."""
    plan: Optional[TruncationPlan] = params.cache.get(CACHE_KEY)
    return plan is not None and layer_number == plan.split_layer + 1


def layer_input(layer_number: int, hidden: torch.Tensor, params: JaggedSeqParams) -> tuple[torch.Tensor, JaggedSeqParams]:
    """What layer ``layer_number`` (global, 1-based) reads: the batch as given up to the
    split layer; the layer after it truncates its input; later ones get truncated input."""
    plan: Optional[TruncationPlan] = params.cache.get(CACHE_KEY)
    if plan is None or layer_number <= plan.split_layer:
        return hidden, params
    if layer_number == plan.split_layer + 1:
        hidden = plan.truncate(hidden)
    return hidden, plan.params
