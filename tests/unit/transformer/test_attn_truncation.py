"""Attention truncation keeps exactly the contextual tokens, the last ``tail_len`` history
tokens and the candidates of each sequence — tokens, positions, timestamps, offsets and
candidate counts checked against a per-sequence dense reference, with the kept count read
from the device or given by the host (then without ``nonzero``) — and the layers' hook
truncates once, at the layer after the split."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.transformer.attn_truncation import (
    attach, kept_count, kept_tokens, layer_input, plan_truncation, truncated_lengths,
)
from megatron_gr.transformer.sequence_parallel import TokenSplit


def random_batch(generator: torch.Generator, *, contextual_len: int):
    batch = 7
    histories = torch.randint(0, 12, (batch,), generator=generator)
    histories[0] = 0  # a user without history
    targets = torch.randint(1, 4, (batch,), generator=generator)
    lengths = contextual_len + histories + targets
    offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
    timestamps = torch.randint(0, 10**9, (int(offsets[-1]),), generator=generator)
    return offsets, targets, timestamps


def dense_reference(offsets, targets, timestamps, *, contextual_len: int, tail_len: int):
    """Per sequence: [contextual | history | candidates] -> [contextual | last tail | candidates]."""
    kept, new_lengths = [], []
    for b in range(targets.numel()):
        start, end = int(offsets[b]), int(offsets[b + 1])
        tokens = list(range(start, end))
        contextual = tokens[:contextual_len]
        candidates = tokens[len(tokens) - int(targets[b]):]
        history = tokens[contextual_len : len(tokens) - int(targets[b])]
        sequence = contextual + history[max(0, len(history) - tail_len):] + candidates
        kept += sequence
        new_lengths.append(len(sequence))
    new_offsets = [0]
    for length in new_lengths:
        new_offsets.append(new_offsets[-1] + length)
    return torch.tensor(kept), torch.tensor(new_offsets), timestamps[torch.tensor(kept)]


def host_count(offsets, targets, *, contextual_len: int, tail_len: int, monkeypatch):
    """The loader's kept count; the plan then must not count on the device."""

    def no_nonzero(*args, **kwargs):
        raise AssertionError("nonzero called although the host gave the kept count")

    monkeypatch.setattr(torch, "nonzero", no_nonzero)
    return kept_count((offsets[1:] - offsets[:-1]).numpy(), targets.numpy(), contextual_len=contextual_len,
                      tail_len=tail_len)


@pytest.mark.parametrize("counted_on_host", [False, True])
@pytest.mark.parametrize("contextual_len, tail_len", [(0, 1), (2, 3), (3, 5), (1, 50)])
def test_truncation_keeps_contextual_tail_and_candidates(contextual_len, tail_len, counted_on_host, monkeypatch):
    generator = torch.Generator().manual_seed(contextual_len * 100 + tail_len)
    offsets, targets, timestamps = random_batch(generator, contextual_len=contextual_len)
    keep, new_offsets, new_stamps = dense_reference(offsets, targets, timestamps, contextual_len=contextual_len,
                                                    tail_len=tail_len)
    mask = kept_tokens(offsets, targets, contextual_len=contextual_len, tail_len=tail_len)
    assert torch.equal(torch.nonzero(mask).squeeze(1), keep)

    tokens = TokenSplit.for_tokens(int(offsets[-1]), None)
    params = tokens.seq_params(offsets, int((offsets[1:] - offsets[:-1]).max()), timestamps=timestamps,
                               num_targets=targets)
    num_kept = None
    if counted_on_host:
        num_kept = host_count(offsets, targets, contextual_len=contextual_len, tail_len=tail_len, monkeypatch=monkeypatch)
    plan = plan_truncation(params, tokens, contextual_len=contextual_len, tail_len=tail_len, split_layer=1,
                           max_targets=int(targets.max()), num_kept=num_kept)
    assert torch.equal(plan.keep, keep)
    assert torch.equal(plan.params.offsets, new_offsets)
    assert torch.equal(plan.params.timestamps, new_stamps)
    assert torch.equal(plan.params.num_targets, targets)
    assert plan.params.max_len >= int((new_offsets[1:] - new_offsets[:-1]).max())
    # positions: each kept token's index within its re-packed sequence
    lengths = new_offsets[1:] - new_offsets[:-1]
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    assert torch.equal(torch.arange(keep.numel()) - plan.params.offsets[:-1][owner], positions)
    # the candidates (the last targets[b] tokens of each sequence) keep their order, at the new ends
    old_candidates = torch.cat([torch.arange(int(offsets[b + 1]) - int(t), int(offsets[b + 1])) for b, t in enumerate(targets)])
    new_candidates = torch.cat([torch.arange(int(new_offsets[b + 1]) - int(t), int(new_offsets[b + 1])) for b, t in enumerate(targets)])
    assert torch.equal(plan.new_position[old_candidates], new_candidates)
    assert torch.equal(truncated_lengths(offsets[1:] - offsets[:-1], targets, contextual_len=contextual_len,
                                         tail_len=tail_len), lengths)
    # hidden rows (any width: hyper-connection streams side by side) follow the tokens
    hidden = torch.randn(int(offsets[-1]), 1, 6, generator=generator)
    assert torch.equal(plan.truncate(hidden), hidden[keep])


@pytest.mark.parametrize("counted_on_host", [False, True])
def test_truncation_drops_the_sequence_parallel_padding_and_pads_anew(counted_on_host, monkeypatch):
    class Group:  # a token split's arithmetic only needs the size
        def size(self):
            return 4

    generator = torch.Generator().manual_seed(3)
    offsets, targets, timestamps = random_batch(generator, contextual_len=2)
    before = TokenSplit(int(offsets[-1]), -int(offsets[-1]) % 4, Group())
    params = before.seq_params(offsets, 40, timestamps=timestamps, num_targets=targets)
    keep, new_offsets, new_stamps = dense_reference(offsets, targets, timestamps, contextual_len=2, tail_len=3)
    num_kept = host_count(offsets, targets, contextual_len=2, tail_len=3, monkeypatch=monkeypatch) if counted_on_host else None
    plan = plan_truncation(params, before, contextual_len=2, tail_len=3, split_layer=2, max_targets=3, num_kept=num_kept)
    # every token's new position (-1: dropped), the padding's rows included in neither
    expected = torch.full((int(offsets[-1]),), -1)
    expected[keep] = torch.arange(keep.numel())
    assert torch.equal(plan.new_position, expected)
    assert torch.equal(plan.keep, keep)
    assert plan.after.num_tokens == keep.numel() and (keep.numel() + plan.after.padding) % 4 == 0
    padded = torch.cat([new_offsets, new_offsets[-1:] + plan.after.padding]) if plan.after.padding else new_offsets
    assert torch.equal(plan.params.offsets, padded)
    assert torch.equal(plan.params.timestamps[: keep.numel()], new_stamps)
    assert plan.params.num_targets.tolist() == targets.tolist() + ([0] if plan.after.padding else [])


def test_layers_read_the_truncated_batch_after_the_split_layer_only():
    offsets, targets = torch.tensor([0, 9, 14]), torch.tensor([2, 1])
    tokens = TokenSplit.for_tokens(14, None)
    params = tokens.seq_params(offsets, 9, num_targets=targets)
    plan = plan_truncation(params, tokens, contextual_len=1, tail_len=2, split_layer=2, max_targets=2)
    attach(params, plan)
    hidden = torch.arange(14.0).view(14, 1, 1)
    for layer in (1, 2):
        out, seen = layer_input(layer, hidden, params)
        assert out is hidden and seen is params
    out, seen = layer_input(3, hidden, params)  # the layer after the split truncates
    assert out.view(-1).tolist() == [0, 5, 6, 7, 8, 9, 11, 12, 13] and seen is plan.params
    later, seen = layer_input(4, out, params)  # later layers get truncated rows already
    assert later is out and seen is plan.params
