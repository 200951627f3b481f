import dataclasses

import numpy as np
import pytest

from megatron_gr.data import SyntheticSpec, UserSequences, generate

SMALL = SyntheticSpec(num_users=300, num_items=500, mean_length=20, max_length=200, seed=7)


@pytest.mark.parametrize("field, value, words", [
    ("num_users", 0, ["num_users=0", "allowed: 1 to"]),
    ("num_items", -3, ["num_items=-3"]),
    ("item_id_space", 10, ["item_id_space=10", "at least num_items"]),
    ("item_id_space", 2**63, ["item_id_space=9223372036854775808", "9223372036854775807"]),
    ("min_length", 0, ["min_length=0"]),
    ("max_length", 2, ["max_length=2", "at least min_length"]),
    ("mean_length", 1.0, ["mean_length=1.0", "between min_length and max_length"]),
    ("length_sigma", -1.0, ["length_sigma=-1.0"]),
    ("zipf_alpha", float("nan"), ["zipf_alpha must be finite"]),
    ("structure", 1.5, ["structure=1.5", "allowed: 0.0 to 1.0"]),
    ("num_successors", 0, ["num_successors=0"]),
    ("seed", -1, ["seed=-1"]),
    ("num_users", 2.5, ["num_users must be an integer", "2.5"]),
    ("structure", True, ["structure must be a number"]),
])
def test_spec_rejects_out_of_range_fields_naming_field_value_and_range(field, value, words):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(SMALL, **{field: value})
    for word in words:
        assert word in str(error.value)


def test_same_spec_gives_the_same_events_and_another_seed_does_not():
    first, second = generate(SMALL), generate(SMALL)
    for name in ("users", "items", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    other = generate(dataclasses.replace(SMALL, seed=8))
    assert not np.array_equal(first.items[:100], other.items[:100])


def test_events_are_grouped_by_user_with_increasing_timestamps_and_star_ratings():
    events = generate(SMALL)
    assert len(events) == events.items.size == events.timestamps.size == events.ratings.size
    assert np.unique(events.users).tolist() == list(range(1, SMALL.num_users + 1))
    assert (np.diff(events.users) >= 0).all()
    same_user = np.diff(events.users) == 0
    assert (np.diff(events.timestamps)[same_user] > 0).all()
    assert set(np.unique(events.ratings).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.unique(events.ratings).size >= 4
    assert events.items.dtype == np.int64 and events.timestamps.dtype == np.int64


def test_item_ids_are_sparse_distinct_draws_from_a_2_pow_40_space():
    events = generate(dataclasses.replace(SMALL, item_id_space=2**40))
    distinct = np.unique(events.items)
    assert distinct.min() >= 1 and distinct.max() <= 2**40
    assert distinct.size <= SMALL.num_items
    assert distinct.max() > 2**36  # spread over the space, not packed at the bottom


def test_item_ids_fill_a_space_as_small_as_the_catalogue():
    spec = dataclasses.replace(SMALL, num_items=50, item_id_space=50)
    distinct = np.unique(generate(spec).items)
    assert distinct.min() >= 1 and distinct.max() <= 50
    assert distinct.size > 40


def test_lengths_stay_in_bounds_with_a_long_tail_and_the_requested_mean():
    spec = SyntheticSpec(num_users=20_000, num_items=100, min_length=3, mean_length=30,
                         max_length=5000, seed=1)
    lengths = UserSequences.from_events(generate(spec)).lengths
    assert lengths.min() >= 3 and lengths.max() <= 5000
    assert abs(lengths.mean() - 30) < 3
    assert np.median(lengths) < 0.8 * lengths.mean()  # skewed right
    assert lengths.max() > 8 * np.median(lengths)


def test_lengths_clip_at_max_and_are_equal_without_spread():
    clipped = generate(dataclasses.replace(SMALL, max_length=25, length_sigma=2.0))
    per_user = np.bincount(clipped.users)[1:]
    assert per_user.max() == 25 and per_user.min() >= SMALL.min_length
    equal = generate(dataclasses.replace(SMALL, length_sigma=0.0))
    assert set(np.bincount(equal.users)[1:].tolist()) == {20}


def hit_rates_at_10(spec):
    """Hit rate@10 of popularity and of first-order transition counts on later transitions.

    Both are fit on the transitions inside the first half of each user's sequence and
    scored on the transitions that end in the second half.
    """
    sequences = UserSequences.from_events(generate(spec))
    lengths = sequences.lengths
    position = np.arange(sequences.num_events) - np.repeat(sequences.offsets[:-1], lengths)
    has_next = position < np.repeat(lengths, lengths) - 1
    previous = sequences.item_ids[:-1][has_next[:-1]]
    following = sequences.item_ids[1:][has_next[:-1]]
    train = (position[:-1][has_next[:-1]] + 1) < np.repeat(lengths // 2, lengths - 1)

    num_codes = sequences.num_items + 1
    popular = np.argsort(-np.bincount(following[train], minlength=num_codes), kind="stable")[:10]
    pairs, counts = np.unique(previous[train] * num_codes + following[train], return_counts=True)
    pairs = pairs[np.lexsort((-counts, pairs // num_codes))]  # by previous item, most seen first
    rank = np.arange(pairs.size) - np.searchsorted(pairs // num_codes, pairs // num_codes)
    top_pairs = pairs[rank < 10]

    test_previous, test_following = previous[~train], following[~train]
    popularity_hits = np.isin(test_following, popular)
    seen = np.isin(test_previous, top_pairs // num_codes)
    transition_hits = np.where(
        seen, np.isin(test_previous * num_codes + test_following, top_pairs), popularity_hits
    )
    return popularity_hits.mean(), transition_hits.mean()


def test_planted_structure_beats_popularity_by_a_wide_margin():
    spec = SyntheticSpec(num_users=3000, num_items=5000, zipf_alpha=0.8, mean_length=40,
                         max_length=300, structure=0.8, seed=3)
    popularity, transitions = hit_rates_at_10(spec)
    assert transitions > 0.6
    assert transitions > 3 * popularity


def test_without_structure_transitions_do_not_beat_popularity():
    spec = SyntheticSpec(num_users=3000, num_items=5000, zipf_alpha=0.8, mean_length=40,
                         max_length=300, structure=0.0, seed=3)
    popularity, transitions = hit_rates_at_10(spec)
    assert transitions < popularity + 0.02


def test_zipf_lengths_follow_the_power_law_on_their_range():
    spec = SyntheticSpec(num_users=40_000, num_items=50, length_distribution="zipf", length_zipf_exponent=1.2,
                         min_length=5, max_length=400, seed=3)
    lengths = UserSequences.from_events(generate(spec)).lengths
    assert lengths.min() >= 5 and lengths.max() <= 400
    support = np.arange(5, 401, dtype=np.float64)
    weights = support**-1.2
    expected = weights / weights.sum()
    # Frequencies of the first lengths and the mean against the law, hand-computed above.
    counts = np.bincount(lengths, minlength=401)[5:401] / lengths.size
    np.testing.assert_allclose(counts[:4], expected[:4], rtol=0.08)
    assert abs(lengths.mean() - (support * expected).sum()) < 0.05 * (support * expected).sum()
    assert lengths.max() > 300  # the tail is reached


def test_zipf_lengths_ignore_mean_and_sigma_and_reject_a_bad_distribution():
    spec = SyntheticSpec(num_users=50, num_items=20, length_distribution="zipf", min_length=100,
                         mean_length=50.0, max_length=200, seed=1)  # mean_length unused: no error
    assert UserSequences.from_events(generate(spec)).lengths.min() >= 100
    with pytest.raises(ValueError, match="length_distribution='pareto'.*lognormal, zipf"):
        dataclasses.replace(SMALL, length_distribution="pareto")
    with pytest.raises(ValueError, match="length_zipf_exponent=-1"):
        dataclasses.replace(SMALL, length_zipf_exponent=-1.0)
