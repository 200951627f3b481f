"""Sequence-parallel padding of jagged batches: the padding is a sequence of its own, so no
real token attends to it, whatever it holds."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.sequence_parallel import TokenSplit
from tests.unit.transformer.helpers import make_layer


def test_padding_becomes_one_more_sequence():
    offsets, ts = torch.tensor([0, 3, 4, 7]), torch.arange(7) * 10
    split = TokenSplit(num_tokens=7, padding=1, group=None)
    params = split.seq_params(offsets, 3, timestamps=ts)
    assert params.offsets.tolist() == [0, 3, 4, 7, 8]
    assert params.max_len == 3 and params.timestamps.tolist() == [*ts.tolist(), 0]
    wide = TokenSplit(num_tokens=2, padding=6, group=None).seq_params(torch.tensor([0, 1, 2]), 1)
    assert wide.max_len == 6  # the padding sequence may be the longest


def test_unsplit_tokens_are_left_alone():
    split = TokenSplit.for_tokens(7, None)
    assert split.padding == 0 and split.scatter(torch.ones(7, 1, 4)).shape == (7, 1, 4)
    params = split.seq_params(torch.tensor([0, 7]), 7)
    assert params.offsets.tolist() == [0, 7]


@pytest.mark.parametrize("lengths, padding", [([4, 1, 6], 1), ([1, 1], 3), ([5], 2)])
def test_real_tokens_never_see_the_padding(megatron_cpu, lengths, padding):
    layer = make_layer(bias=True)
    g = torch.Generator().manual_seed(len(lengths) + padding)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ts = torch.cat([torch.sort(torch.randint(0, 50, (n,), generator=g))[0] for n in lengths])
    real = sum(lengths)
    x = torch.randn(real, 1, 8, dtype=torch.float64, generator=g)
    expected, _ = layer(x, packed_seq_params=JaggedSeqParams.from_offsets(offsets, max(lengths), timestamps=ts))

    split = TokenSplit(num_tokens=real, padding=padding, group=None)
    garbage = 1e3 * torch.randn(padding, 1, 8, dtype=torch.float64, generator=g)
    out, _ = layer(torch.cat([x, garbage]), packed_seq_params=split.seq_params(offsets, max(lengths), timestamps=ts))
    # float64 rounding only (the padded batch is wider); padding of size 1e3 leaking into
    # any real token would move it by far more.
    torch.testing.assert_close(out[:real], expected, rtol=0, atol=1e-12)


def test_query_time_bias_ignores_the_padding(megatron_cpu):
    """With the query-time bias (time_bias_origin='query') the padding carries query times
    too (zeros) and still changes no real token."""
    layer = make_layer(bias=True, time_bias_origin="query")
    g = torch.Generator().manual_seed(7)
    lengths, padding = [4, 1, 6], 1
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ts = torch.cat([torch.sort(torch.randint(0, 50, (n,), generator=g))[0] for n in lengths])
    query = ts + torch.randint(0, 40, ts.shape, generator=g)
    x = torch.randn(sum(lengths), 1, 8, dtype=torch.float64, generator=g)
    params = JaggedSeqParams.from_offsets(offsets, max(lengths), timestamps=ts, query_timestamps=query)
    expected, _ = layer(x, packed_seq_params=params)
    split = TokenSplit(num_tokens=sum(lengths), padding=padding, group=None)
    padded = split.seq_params(offsets, max(lengths), timestamps=ts, query_timestamps=query)
    assert padded.query_timestamps.tolist() == [*query.tolist(), 0]
    garbage = 1e3 * torch.randn(padding, 1, 8, dtype=torch.float64, generator=g)
    out, _ = layer(torch.cat([x, garbage]), packed_seq_params=padded)
    torch.testing.assert_close(out[: sum(lengths)], expected, rtol=0, atol=1e-12)
    # and the query times matter: later ones give other outputs
    later = JaggedSeqParams.from_offsets(offsets, max(lengths), timestamps=ts, query_timestamps=query + 1000)
    assert not torch.allclose(layer(x, packed_seq_params=later)[0], expected)


class _Rank:
    """The two things TokenSplit asks of a process group: its size and this rank."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_dropout_keys_follow_the_tokens_to_each_rank():
    """The padded batch's keys (padding keys negative, unlike any real token's) and, on
    each rank, the slice of them that ``scatter`` gives that rank's tokens."""
    keys = torch.tensor([0, 1, 2, 32, 64, 65, 66])  # samples 0, 1, 2 of max_seq_len 32
    for size in (2, 4):
        for rank in range(size):
            split = TokenSplit.for_tokens(7, _Rank(rank, size))
            params = split.seq_params(torch.tensor([0, 3, 4, 7]), 3, token_keys=keys, dropout_seed=5)
            padded = params.token_keys
            assert params.dropout_seed == 5 and padded.shape == (7 + split.padding,)
            assert padded[:7].tolist() == keys.tolist() and bool((padded[7:] < 0).all())
            assert len(set(padded.tolist())) == padded.numel()
            # scatter() gives rank r the r-th of `size` equal chunks of the padded tokens
            mine = torch.arange(padded.numel()).chunk(size)[rank]
            assert torch.equal(params.local_token_keys, padded[mine])
    unsplit = TokenSplit.for_tokens(7, None).seq_params(torch.tensor([0, 7]), 7, token_keys=keys)
    assert unsplit.token_keys is keys and unsplit.local_token_keys is keys
