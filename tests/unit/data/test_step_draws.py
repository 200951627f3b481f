"""What a training step draws once for its whole global batch: the sampled-softmax
negatives, the dropout seed, and each token's dropout key. None of it depends on how the
global batch is cut into micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gr.data import LeaveOneOutSplit, UserSequences, generate
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.loader import PARTITIONS, TrainingBatches
from megatron_gr.data.synthetic import SyntheticSpec

MAX_LEN = 30


@pytest.fixture(scope="module")
def split():
    spec = SyntheticSpec(num_users=120, num_items=50, mean_length=20.0, max_length=80, seed=5)
    return LeaveOneOutSplit.build(UserSequences.from_events(generate(spec)))


def loader(split, *, balance="none", micro_batches=4, negatives=(7, 5), raw=False, seed=9) -> TrainingBatches:
    """Global batches of 24 users in ``micro_batches`` micro-batches."""
    items = ItemSpace(vocab=split.sequences.item_vocab, raw_keys=raw)
    return TrainingBatches(split, items, max_seq_len=MAX_LEN, micro_batch_size=24 // micro_batches,
                           num_micro_batches=micro_batches, seed=seed,
                           partition_fn=PARTITIONS[balance], num_negatives=negatives[0],
                           num_in_batch_negatives=negatives[1])


def tokens_by_key(batches) -> dict:
    """``{token key: (user, item, label, timestamp)}`` over the micro-batches of a step."""
    out = {}
    for b in batches:
        users = torch.repeat_interleave(b.user_ids, b.lengths)
        for key, user, item, label, ts in zip(b.token_keys.tolist(), users.tolist(), b.item_ids.tolist(),
                                              b.labels.tolist(), b.timestamps.tolist()):
            assert key not in out, f"key {key} names two tokens of one global batch"
            out[key] = (user, item, label, ts)
    return out


def test_any_cut_of_a_global_batch_carries_the_same_draws(split):
    """One micro-batch of 24 users, four cut in stream order, four balanced by attention
    cost: the same negatives (on every micro-batch), dropout seed and keyed tokens."""
    cuts = [loader(split, micro_batches=1), loader(split), loader(split, balance="attention_cost")]
    for _ in range(3):
        steps = [cut.next_step() for cut in cuts]
        assert len({b.dropout_seed for step in steps for b in step}) == 1
        for step in steps:
            for b in step:
                assert torch.equal(b.negative_ids, steps[0][0].negative_ids)
        reference = tokens_by_key(steps[0])
        assert tokens_by_key(steps[1]) == reference and tokens_by_key(steps[2]) == reference
    assert not torch.equal(steps[0][0].negative_ids, cuts[0].next_step()[0].negative_ids)  # a new step, new draws


def test_token_keys_are_global_sample_index_and_position(split):
    batches = loader(split).next_step()
    first_sample = 0
    for b in batches:
        for s, (start, end) in enumerate(zip(b.offsets[:-1].tolist(), b.offsets[1:].tolist())):
            keys = b.token_keys[start:end]
            # contiguous cut: micro-batch g holds samples 6 g .. 6 g + 5 of the global batch
            assert torch.equal(keys // MAX_LEN, torch.full_like(keys, first_sample + s))
            assert torch.equal(keys % MAX_LEN, torch.arange(end - start))
        first_sample += b.batch_size


def test_negatives_are_uniform_corpus_items_then_labels_of_the_global_batch(split):
    batches = loader(split, negatives=(40, 30)).next_step()
    negatives = batches[0].negative_ids
    assert negatives.shape == (70,) and negatives.dtype == torch.int64
    num_items = split.sequences.num_items
    assert bool(((negatives[:40] >= 1) & (negatives[:40] <= num_items)).all())
    labels = set(torch.cat([b.labels for b in batches]).tolist())
    assert set(negatives[40:].tolist()) <= labels


def test_raw_ids_map_negatives_like_labels(split):
    dense, raw = loader(split).next_step(), loader(split, raw=True).next_step()
    vocab = torch.from_numpy(split.sequences.item_vocab)
    assert torch.equal(vocab[dense[0].negative_ids], raw[0].negative_ids)
    assert torch.equal(vocab[dense[1].labels], raw[1].labels)


def test_in_batch_negatives_follow_label_frequencies(split):
    """Every label occurrence of the global batch equally likely: each item drawn in
    proportion to its count, within 5 binomial standard deviations over 20000 draws."""
    draws = 20000
    batches = loader(split, negatives=(0, draws)).next_step()
    labels = torch.cat([b.labels for b in batches])
    expected = torch.bincount(labels, minlength=split.sequences.num_items + 1).double() / labels.numel()
    drawn = torch.bincount(batches[0].negative_ids, minlength=expected.numel()).double() / draws
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-12
    assert bool(((drawn - expected).abs() <= bound).all()), float(((drawn - expected).abs() / bound).max())
    assert math.isclose(float(drawn.sum()), 1.0)


def test_the_step_draws_come_from_the_seed(split):
    a, b, c = loader(split).next_step(), loader(split).next_step(), loader(split, seed=10).next_step()
    assert torch.equal(a[0].negative_ids, b[0].negative_ids) and a[0].dropout_seed == b[0].dropout_seed
    assert not torch.equal(a[0].negative_ids, c[0].negative_ids) and a[0].dropout_seed != c[0].dropout_seed
    assert 0 <= a[0].dropout_seed < 2**63
