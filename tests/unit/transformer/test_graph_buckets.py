"""Static token counts for CUDA graphs: bucket sizes, the padding layout, and a padded batch
training exactly as the unpadded one (CPU, fp32: the padding is invisible to real tokens)."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.transformer.graph_buckets import TokenBuckets, padded_offsets, padding_lengths
from megatron_gr.transformer.sequence_parallel import TokenSplit


def test_buckets_grow_geometrically_in_aligned_steps():
    buckets = TokenBuckets.build(max_tokens=3000, max_seq_len=50, max_sequences=64, multiple_of=3)
    sizes = buckets.sizes
    assert all(s % 384 == 0 for s in sizes)  # lcm(128, 3)
    assert sizes[-1] >= 3000 and sizes[-2] < 3000
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert all(b <= max(a + 384, 1.25 * a + 384) for a, b in zip(sizes, sizes[1:]))
    assert buckets.bucket(1) == sizes[0] and buckets.bucket(sizes[2]) == sizes[2] and buckets.bucket(sizes[2] + 1) == sizes[3]
    assert buckets.bucket(sizes[-1] + 1) is None
    assert buckets.capacity(768) == 64 + 16  # 768 / 50 rounded up


def test_padding_layout_by_hand_and_on_the_device():
    assert padding_lengths(9, 3, 16, 8, 5) == [5, 2, 0, 0, 0]
    offsets = torch.tensor([0, 3, 4, 9])
    torch.testing.assert_close(padded_offsets(offsets, padding=7, slots=5, max_seq_len=5),
                               torch.tensor([0, 3, 4, 9, 14, 16, 16, 16, 16]))
    with pytest.raises(ValueError, match="cannot pad 9 tokens"):
        padding_lengths(9, 3, 16, 4, 5)  # one slot cannot hold 7 tokens of at most 5


def test_token_split_pads_a_batch_to_its_bucket():
    buckets = TokenBuckets.build(max_tokens=200, max_seq_len=50, max_sequences=4)
    split = TokenSplit.for_tokens(9, None, num_sequences=3, buckets=buckets)
    assert (split.padding, split.padding_sequences, split.static_max_len) == (119, 4 + 3 - 3, 50)
    params = split.seq_params(torch.tensor([0, 3, 4, 9]), 5, timestamps=torch.arange(9))
    assert params.offsets.tolist() == [0, 3, 4, 9, 59, 109, 128, 128]
    assert params.max_len == 50 and params.timestamps.shape == (128,)
    hidden = torch.randn(9, 1, 2)
    padded = split.scatter(hidden)
    assert padded.shape == (128, 1, 2)
    torch.testing.assert_close(split.gather(padded), hidden, rtol=0, atol=0)
    # too many tokens for any bucket: no padding
    assert TokenSplit.for_tokens(5000, None, num_sequences=3, buckets=buckets).padding == 0


def test_bucket_padding_carries_token_keys_and_query_timestamps():
    """The padding of a bucket gets negative dropout keys (no real token has one, so no
    real token's mask changes) and query timestamps, as the captured graphs read them."""
    buckets = TokenBuckets.build(max_tokens=200, max_seq_len=50, max_sequences=4)
    split = TokenSplit.for_tokens(9, None, num_sequences=3, buckets=buckets)
    keys, query = torch.arange(9) * 64 + 5, torch.arange(9) + 1000
    params = split.seq_params(torch.tensor([0, 3, 4, 9]), 5, timestamps=torch.arange(9), query_timestamps=query,
                              token_keys=keys, dropout_seed=7)
    assert params.token_keys.tolist() == [*keys.tolist(), *range(-1, -120, -1)]
    assert params.local_token_keys is params.token_keys and params.dropout_seed == 7
    assert params.query_timestamps.tolist() == [*query.tolist(), *[0] * 119]


def test_a_padded_batch_trains_as_the_unpadded_one(megatron_cpu, tmp_path):
    from megatron_gr.training.model_setup import unwrap
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    trainer = Trainer(tiny_config(tmp_path, model={"hidden_dropout": 0.0, "embedding_dropout": 0.0}))
    model = unwrap(trainer.model[0])
    batch = trainer.loader.next_step()[0]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(buckets):
        model.token_buckets = buckets
        loss = model(batch).sum()
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    model.train()
    plain_loss, plain_grads = loss_and_grads(None)
    buckets = TokenBuckets.build(max_tokens=4 * batch.num_tokens, max_seq_len=model.config.max_seq_len,
                                 max_sequences=batch.batch_size)
    assert buckets.bucket(batch.num_tokens) > batch.num_tokens  # really padded
    padded_loss, padded_grads = loss_and_grads(buckets)
    model.token_buckets = None
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-6, atol=0)
    for a, b in zip(padded_grads, plain_grads):
        if b is None:
            assert a is None or not a.abs().max()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
