"""Input encodings of every fidelity option against sums written out by hand: item scaling,
positions from the start or the end, time gaps since the previous event or until the query
time, and each encoding off."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.config import GRTransformerConfig
from megatron_gr.models.preprocessor import InputPreprocessor

WIDTH = 4  # sqrt(4) = 2: the item scale
# Two sequences: 3 events at 0, 4, 13 s (query times 4, 13, 20: the next events, the last
# one the held-out target) and 2 events at 100, 101 s (query times 101, 200).
OFFSETS = torch.tensor([0, 3, 5])
TIMESTAMPS = torch.tensor([0, 4, 13, 100, 101])
QUERY = torch.tensor([4, 13, 20, 101, 200])


def make(**options) -> InputPreprocessor:
    config = GRTransformerConfig(
        num_layers=1, hidden_size=WIDTH, num_attention_heads=1, max_seq_len=5, num_time_buckets=8,
        embedding_dropout=0.0, params_dtype=torch.float64, **options,
    )
    module = InputPreprocessor(config)
    with torch.no_grad():  # row r of the position table is r * 10, row b of the time table b * 1000
        if module.position_embedding is not None:
            module.position_embedding.weight.copy_(torch.arange(5, dtype=torch.float64).view(-1, 1).expand(5, WIDTH) * 10)
        if module.time_embedding is not None:
            module.time_embedding.weight.copy_(torch.arange(8, dtype=torch.float64).view(-1, 1).expand(8, WIDTH) * 1000)
    return module


ITEMS = torch.arange(5 * WIDTH, dtype=torch.float64).view(5, WIDTH) / 100


def expected(scale: float, positions: list[int], time_buckets: list[int]) -> torch.Tensor:
    rows = [ITEMS[t] * scale + positions[t] * 10 + time_buckets[t] * 1000 for t in range(5)]
    return torch.stack(rows).unsqueeze(1)


@pytest.mark.parametrize(
    "options, positions, time_buckets",
    [
        # today's encodings: positions from the start; sqrt buckets of the gap since the
        # previous event: 0, 4 -> 2, 9 -> 3 | 0, 1 -> 1
        (dict(), [0, 1, 2, 0, 1], [0, 2, 3, 0, 1]),
        # until the query time: 4 -> 2, 9 -> 3, 7 -> 2 | 1 -> 1, 99 -> 9, clipped to bucket 7
        (dict(time_feature="until_query"), [0, 1, 2, 0, 1], [2, 3, 2, 1, 7]),
        # positions counted back from each sequence's last event
        (dict(position_encoding="from_end"), [2, 1, 0, 1, 0], [0, 2, 3, 0, 1]),
        # hstu_log buckets of the gap until the query: ln4/.301 = 4.6, ln9/.301 = 7.3, ln7/.301 = 6.5 | 0, 7 (clipped)
        (dict(time_feature="until_query", time_bucket_fn="hstu_log"), [0, 1, 2, 0, 1], [4, 7, 6, 0, 7]),
    ],
)
def test_encodings_by_hand(options, positions, time_buckets):
    out = make(**options)(ITEMS, OFFSETS, TIMESTAMPS, query_timestamps=QUERY)
    torch.testing.assert_close(out, expected(2.0, positions, time_buckets), rtol=0, atol=1e-12)


def test_encodings_off_and_unscaled_items():
    module = make(time_feature="none", position_encoding="none", scale_item_embeddings=False)
    torch.testing.assert_close(module(ITEMS, OFFSETS, TIMESTAMPS), ITEMS.unsqueeze(1), rtol=0, atol=0)


def test_query_time_feature_needs_query_timestamps():
    with pytest.raises(ValueError, match="needs the batch's query_timestamps"):
        make(time_feature="until_query")(ITEMS, OFFSETS, TIMESTAMPS)


def test_every_option_draws_the_same_random_numbers():
    """Tables of encodings that are off are drawn and dropped (no parameter without a
    gradient), so the parameters built after them start equal under every option."""
    draws = []
    for options in (dict(), dict(time_feature="none", position_encoding="none")):
        torch.manual_seed(0)
        config = GRTransformerConfig(num_layers=1, hidden_size=WIDTH, num_attention_heads=1, max_seq_len=5, **options)
        module = InputPreprocessor(config)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    assert module.time_embedding is None and module.position_embedding is None
    assert sum(p.numel() for p in module.parameters()) == 0
