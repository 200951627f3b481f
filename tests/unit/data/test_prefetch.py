"""PrefetchingStream hands out exactly the batches of the stream it wraps, reports the
position of the steps handed out, and drops the step built ahead when a state is loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gr.data import LeaveOneOutSplit, SyntheticSpec, UserSequences, generate
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.loader import TrainingBatches
from megatron_gr.data.prefetch import PrefetchingStream


def _stream() -> TrainingBatches:
    sequences = UserSequences.from_events(generate(SyntheticSpec(num_users=40, num_items=30, mean_length=10.0,
                                                                 max_length=30, seed=4)))
    split = LeaveOneOutSplit.build(sequences)
    items = ItemSpace(vocab=split.sequences.item_vocab, raw_keys=False)
    return TrainingBatches(split, items, max_seq_len=12, micro_batch_size=3, num_micro_batches=2, seed=9)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("item_ids", "timestamps", "query_timestamps", "offsets", "labels", "user_ids", "negative_ids",
                     "token_keys"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=0, atol=0)
        assert (x.max_len, x.dropout_seed) == (y.max_len, y.dropout_seed)


def test_same_batches_and_positions_as_the_wrapped_stream():
    plain, wrapped = _stream(), PrefetchingStream(_stream(), torch.device("cpu"))
    for _ in range(5):
        _same(wrapped.next_step(), plain.next_step())
        assert wrapped.consumed_samples == plain.consumed_samples
        assert wrapped.state_dict() == plain.state_dict()
    wrapped.close()  # waits for the step being built ahead (a worker thread: no timing assumption)
    assert wrapped.stream.consumed_samples > plain.consumed_samples  # one step built ahead
    assert wrapped.global_batch_size == plain.global_batch_size


def test_without_the_worker_each_step_is_built_when_asked_for():
    plain, inline = _stream(), PrefetchingStream(_stream(), torch.device("cpu"), background=False)
    for _ in range(3):
        _same(inline.next_step(), plain.next_step())
        assert inline.stream.consumed_samples == inline.consumed_samples == plain.consumed_samples  # nothing ahead
    inline.load_state_dict({"consumed_samples": 0})
    fresh = _stream()
    _same(inline.next_step(), fresh.next_step())
    inline.close()
    assert inline.stream.consumed_samples == fresh.consumed_samples


def test_loading_a_state_drops_the_step_built_ahead():
    wrapped = PrefetchingStream(_stream(), torch.device("cpu"))
    first = wrapped.next_step()
    wrapped.next_step()
    wrapped.load_state_dict({"consumed_samples": 0})
    assert wrapped.consumed_samples == 0
    _same(wrapped.next_step(), first)


def test_errors_of_the_worker_reach_the_training_thread():
    class Broken:
        consumed_samples = 0

        def next_step(self):
            raise ValueError("bad data at step 3")

    with pytest.raises(ValueError, match="bad data at step 3"):
        PrefetchingStream(Broken(), torch.device("cpu")).next_step()


@pytest.mark.gpu
def test_gpu_batches_arrive_on_the_device_with_their_values():
    plain, wrapped = _stream(), PrefetchingStream(_stream(), torch.device("cuda"))
    for _ in range(3):
        got, want = wrapped.next_step(), plain.next_step()
        assert all(b.item_ids.is_cuda and b.offsets.is_cuda and b.token_keys.is_cuda for b in got)
        # the offsets also stay on the host (context parallelism plans from them)
        assert all(b.host_offsets.device.type == "cpu" and torch.equal(b.host_offsets, b.offsets.cpu()) for b in got)
        _same([b.to("cpu") for b in got], want)
    assert np.isfinite(float(got[0].timestamps.float().sum()))


@pytest.mark.gpu
def test_gpu_ranking_and_channel_batches_are_copied_ahead_with_host_offsets():
    """The side-stream copy serves every batch type: a ranking batch keeps its offsets on the
    host (no device wait in the step), and ULTRA-HSTU's per-channel batches are copied too."""
    from megatron_gr.data.prefetch import _tensors, _to_device
    from megatron_gr.data.ranking.channel_batches import ChannelBatch
    from megatron_gr.data.ranking.loader import SequenceLayout, make_batch
    from tests.unit.data.test_ranking_batches import indexed

    data = indexed()
    batch = make_batch(data, SequenceLayout(data, max_seq_len=20, use_history=True), np.array([0, 1]))
    device = torch.device("cuda")
    moved = _to_device(batch, device)
    assert moved.offsets.is_cuda and moved.candidate_ids.is_cuda
    assert moved.host_offsets.device.type == "cpu" and moved.host_offsets.tolist() == batch.offsets.tolist()
    channels = ChannelBatch({"imp": batch, "click": batch}, max_candidates=2)
    channels.kept_tokens = {"imp": 7, "click": 5}  # counts the truncation planned on the host stay ints
    channels = _to_device(channels, device)
    assert channels.kept_tokens == {"imp": 7, "click": 5}
    assert all(part.offsets.is_cuda and part.host_offsets is not None for part in channels.channels.values())
    assert len(_tensors(channels)) == 2 * len(_tensors(moved)) > 0


def test_a_batch_already_on_the_device_is_not_moved_again():
    """``JaggedBatch.to`` hands back a batch that is on the device with its host offsets (what
    the prefetcher delivers) as it is; a batch without host offsets gets them (a new batch)."""
    from megatron_gr.data.jagged import JaggedBatch

    batch = JaggedBatch(item_ids=torch.tensor([3, 4, 5]), timestamps=torch.tensor([1, 2, 3]), ratings=torch.ones(3),
                        offsets=torch.tensor([0, 1, 3]), user_ids=torch.tensor([7, 8]))
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.host_offsets, batch.offsets)
    assert moved.to(torch.device("cpu")) is moved
    assert all(torch.equal(getattr(moved, name), getattr(batch, name)) for name in ("item_ids", "offsets", "user_ids"))
