"""The key exchange of context parallelism in one process: every simulated rank's view of a
micro-batch (``BatchShard``), its gathered keys and values (the all-gather replaced by the
concatenation of all ranks' contributions) and the gradients it sends back (the
reduce-scatter replaced by the sum of all ranks' contributions): every segment gets the keys
of its sequence, and the key gradients of all ranks add up to those of the whole batch.
Sequence-parallel padding and a rank without tokens included."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.transformer.context_parallel import BatchShard, attention
from megatron_gr.transformer.sequence_parallel import TokenSplit


class Group:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def views(lengths, size, threshold, pad_to=1):
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    timestamps = torch.arange(offsets[-1]) * 10
    out = []
    for rank in range(size):
        shard = BatchShard.of(offsets, group=Group(size, rank), split_threshold=threshold, device=torch.device("cpu"))
        # pad_to > 1 stands for a sequence-parallel group of that size
        n = shard.num_tokens(int(offsets[-1]))
        tokens = TokenSplit(n, (-n % pad_to) or (pad_to if n == 0 else 0), None)
        params = shard.seq_params(tokens, offsets, max(lengths), timestamps=timestamps)
        out.append((shard, tokens, params))
    return offsets, timestamps, out


def local(values, shard, tokens):
    return torch.cat([shard.take(values), values.new_zeros(tokens.padding, *values.shape[1:])])


@pytest.mark.parametrize("lengths, size, threshold, pad_to", [
    ([23, 5, 40, 2, 9], 2, 8, 1), ([23, 5, 40, 2, 9], 3, 8, 2), ([3], 2, 4, 1), ([17, 30], 4, 8, 3),
])
def test_exchange_delivers_keys_and_returns_their_gradients(monkeypatch, lengths, size, threshold, pad_to):
    g = torch.Generator().manual_seed(len(lengths) + size)
    offsets, timestamps, ranks = views(lengths, size, threshold, pad_to)
    k, v = torch.randn(int(offsets[-1]), 2, 3, generator=g), torch.randn(int(offsets[-1]), 2, 5, generator=g)

    # The all-gather delivers every rank's contribution, in rank order.
    sends = []
    for shard, tokens, params in ranks:
        exchange = params.context_parallel
        rows = torch.cat([local(k, shard, tokens), local(v, shard, tokens)], dim=-1)
        send = rows.new_zeros(exchange.send_len, *rows.shape[1:])
        send[: exchange.send_index.numel()] = rows[exchange.send_index]
        sends.append(send)
    gathered = torch.cat(sends)
    monkeypatch.setattr(attention.dist, "all_gather_into_tensor", lambda out, inp, group: out.copy_(gathered))

    expected_dk, expected_dv = torch.zeros_like(k), torch.zeros_like(v)
    key_grads, captured = [], []
    for shard, tokens, params in ranks:
        exchange, layout = params.context_parallel, params.context_parallel.key_layout
        keys, values = exchange.gather_keys(local(k, shard, tokens), local(v, shard, tokens))
        assert keys.shape[0] == int(layout.key_offsets[-1])
        real = shard.split.num_keys  # the padding segment's keys come last
        key_token = torch.from_numpy(shard.split.key_token)
        torch.testing.assert_close(keys[:real], k[key_token], rtol=0, atol=0)
        torch.testing.assert_close(values[:real], v[key_token], rtol=0, atol=0)
        assert not keys[real:].any()  # padding rows are zeros
        torch.testing.assert_close(layout.key_timestamps[:real], timestamps[key_token], rtol=0, atol=0)
        assert int(params.offsets[-1]) == shard.num_tokens(0) + tokens.padding
        dk, dv = torch.randn(keys.shape, generator=g), torch.randn(values.shape, generator=g)
        expected_dk.index_add_(0, key_token, dk[:real])
        expected_dv.index_add_(0, key_token, dv[:real])
        key_grads.append((dk, dv))
        # First pass: record what the rank hands to the reduce-scatter.
        monkeypatch.setattr(attention.dist, "reduce_scatter_tensor",
                            lambda out, inp, group: (captured.append(inp.clone()), out.zero_()))
        exchange.scatter_key_grads(dk, dv, torch.float32)

    summed = sum(captured).view(size, -1, *captured[0].shape[1:]) if captured else None
    got_dk, got_dv = torch.zeros_like(k), torch.zeros_like(v)
    for rank, ((shard, tokens, params), (dk, dv)) in enumerate(zip(ranks, key_grads)):
        if summed is not None:  # the reduce-scatter hands each rank the sum of its slots
            monkeypatch.setattr(attention.dist, "reduce_scatter_tensor",
                                lambda out, inp, group, rank=rank: out.copy_(summed[rank]))
        grad_k, grad_v = params.context_parallel.scatter_key_grads(dk, dv, torch.float32)
        index = shard.token_index
        got_dk.index_add_(0, index, grad_k[: index.numel()])
        got_dv.index_add_(0, index, grad_v[: index.numel()])
    torch.testing.assert_close(got_dk, expected_dk, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_dv, expected_dv, rtol=1e-6, atol=1e-6)


def test_last_tokens_and_take():
    offsets, _, ranks = views([23, 5, 40, 2, 9], 2, 8)
    ends = {}
    for shard, _, _ in ranks:
        last, sequences = shard.last_tokens(offsets)
        for token, sequence in zip(shard.token_index[last].tolist(), sequences.tolist()):
            ends[sequence] = token
        values = torch.arange(int(offsets[-1])) * 3
        assert shard.take(values).tolist() == (shard.token_index * 3).tolist()
    assert ends == {b: int(offsets[b + 1]) - 1 for b in range(5)}


def test_a_rank_without_tokens_gets_one_padding_token():
    _, _, ranks = views([3], 2, 4)  # one short sequence: placed whole on rank 0
    (_, tokens0, params0), (shard1, tokens1, params1) = ranks
    assert shard1.num_tokens(3) == 0 and tokens1.padding == 1
    assert params1.offsets.tolist() == [0, 1] and params1.max_len == 1
    assert tokens0.padding == 0 and params0.offsets.tolist() == [0, 3]
