"""Synthetic interaction events with planted sequential structure, at any scale.

Each user's sequence is a walk on a hidden Markov chain over items: every item has
``num_successors`` fixed likely successors (drawn by popularity, weighted 1, 1/2, 1/3, ...).
With probability ``structure`` the next item is one of the current item's successors,
otherwise a fresh draw from a Zipf popularity law. A next-item model can therefore reach a
hit rate near ``structure`` where popularity alone stays far lower, which makes the data a
quick learnability check for the whole training stack.

Raw item ids are distinct sparse ids in ``[1, item_id_space]`` (2**40 and beyond, as hashed
ids in production are); users are ``1..num_users``. Sequence lengths are long-tailed: a
lognormal above ``min_length`` clipped at ``max_length`` (``length_distribution:
lognormal``), or a discrete power law ``p(L) ~ L**-length_zipf_exponent`` on
``[min_length, max_length]`` (``zipf``, the shape of public HSTU benchmarks, e.g. Zipf(1.2)
histories up to 4096 events). Timestamps increase per user in
sessions: minutes apart within a session, days between sessions. Ratings are 1..5 around a
per-item mean. Events come out grouped by user, in time order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megatron_gr.data.sequences import RawEvents

_INT64_MAX = int(np.iinfo(np.int64).max)
# Sessions: users start within three years of 2015-01-01 UTC; gaps are exponential, minutes
# within a session and days between sessions, never under one second (timestamps increase).
_FIRST_START = 1_420_070_400
_START_WINDOW_SECONDS = 3 * 365 * 86_400
_IN_SESSION_GAP_SECONDS = 300.0
_BETWEEN_SESSIONS_GAP_SECONDS = 3 * 86_400.0
_NEW_SESSION_PROBABILITY = 0.15
_MEAN_RATING_RANGE = (2.5, 4.5)
_RATING_NOISE = 0.9
# Below this many candidate ids per item, distinct ids are cheaper to draw by permutation.
_DENSE_ID_SPACE_RATIO = 4
LENGTH_DISTRIBUTIONS = ("lognormal", "zipf")


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; every field is checked at construction."""

    # --- scale ---
    num_users: int = 1000
    """Users, each with one sequence; raw ids 1..num_users."""
    num_items: int = 5000
    """Catalogue size; rarely drawn tail items may not appear in the events."""
    item_id_space: int = 2**40
    """Raw item ids are distinct draws from [1, item_id_space]; at least num_items."""

    # --- sequence lengths ---
    length_distribution: Literal["lognormal", "zipf"] = "lognormal"
    """``lognormal``: min_length plus a lognormal of mean ``mean_length - min_length`` and
    sigma ``length_sigma``, clipped at max_length. ``zipf``: ``p(L) ~ L**-length_zipf_exponent``
    for every integer L in [min_length, max_length] (mean_length and length_sigma unused)."""
    min_length: int = 5
    """Shortest sequence."""
    mean_length: float = 50.0
    """Mean length before clipping at max_length (lognormal only)."""
    max_length: int = 1000
    """Longest sequence."""
    length_sigma: float = 1.0
    """Lognormal sigma of the length above min_length: 0 gives equal lengths, more a longer
    tail (lognormal only)."""
    length_zipf_exponent: float = 1.2
    """Exponent a of the zipf length law ``p(L) ~ L**-a`` (zipf only): larger a, more short
    sequences; at 1.2 on [5, 4096] the mean is about 360 events."""

    # --- what there is to learn ---
    zipf_alpha: float = 1.0
    """Popularity exponent: item of rank r is drawn with weight r**-zipf_alpha (0: uniform)."""
    structure: float = 0.8
    """Probability that the next item follows the planted chain instead of popularity."""
    num_successors: int = 4
    """Likely successors of each item on the planted chain; fewer is easier to learn."""

    seed: int = 0
    """Seed of the generator; the same spec always gives the same events."""

    def __post_init__(self):
        _check_int("num_users", self.num_users, 1, _INT64_MAX)
        _check_int("num_items", self.num_items, 1, 2**31 - 1)
        _check_int("item_id_space", self.item_id_space, self.num_items, _INT64_MAX,
                   "at least num_items")
        if self.length_distribution not in LENGTH_DISTRIBUTIONS:
            raise ValueError(
                f"SyntheticSpec.length_distribution={self.length_distribution!r} is not allowed; "
                f"choose one of {', '.join(LENGTH_DISTRIBUTIONS)}"
            )
        _check_int("min_length", self.min_length, 1, _INT64_MAX)
        _check_int("max_length", self.max_length, self.min_length, 1_000_000,
                   "at least min_length")
        if self.length_distribution == "lognormal":  # the zipf law has no mean parameter
            _check_real("mean_length", self.mean_length, self.min_length, self.max_length,
                        "between min_length and max_length")
        _check_real("length_sigma", self.length_sigma, 0.0, 4.0)
        _check_real("length_zipf_exponent", self.length_zipf_exponent, 0.0, 10.0)
        _check_real("zipf_alpha", self.zipf_alpha, 0.0, 10.0)
        _check_real("structure", self.structure, 0.0, 1.0)
        _check_int("num_successors", self.num_successors, 1, 1024)
        _check_int("seed", self.seed, 0, _INT64_MAX)


def generate(spec: SyntheticSpec) -> RawEvents:
    """The events that ``spec`` describes, in user order and time order within a user."""
    rng = np.random.default_rng(spec.seed)
    raw_item_ids = _distinct_sparse_ids(rng, spec.num_items, spec.item_id_space)  # by rank
    popularity_cdf = _zipf_cdf(spec.num_items, spec.zipf_alpha)
    successors = _draw_from_cdf(rng, popularity_cdf, (spec.num_items, spec.num_successors))
    lengths = _draw_lengths(rng, spec)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    item_ranks = _walk(rng, spec, lengths, offsets, successors, popularity_cdf)
    timestamps = _timestamps(rng, lengths, offsets)
    item_mean_rating = rng.uniform(*_MEAN_RATING_RANGE, size=spec.num_items)
    noisy = item_mean_rating[item_ranks] + rng.normal(0.0, _RATING_NOISE, size=item_ranks.size)
    ratings = np.clip(np.rint(noisy), 1, 5).astype(np.float32)
    users = np.repeat(np.arange(1, spec.num_users + 1, dtype=np.int64), lengths)
    return RawEvents(users, raw_item_ids[item_ranks], timestamps, ratings)


def _walk(rng, spec, lengths, offsets, successors, popularity_cdf) -> np.ndarray:
    """Item ranks of every event, all users stepped together: one vectorised step a position."""
    # Longest first, so the users still walking at step t are a prefix of this order.
    order = np.argsort(-lengths, kind="stable")
    starts = offsets[:-1][order]
    sorted_lengths = lengths[order]
    successor_cdf = np.cumsum(1.0 / np.arange(1, spec.num_successors + 1))
    successor_cdf /= successor_cdf[-1]

    ranks = np.empty(int(offsets[-1]), dtype=np.int64)
    current = _draw_from_cdf(rng, popularity_cdf, spec.num_users)
    ranks[starts] = current
    for step in range(1, int(sorted_lengths[0])):
        walking = int(np.searchsorted(-sorted_lengths, -step, side="left"))
        current = current[:walking]
        slot = _draw_from_cdf(rng, successor_cdf, walking)
        follow = rng.random(walking) < spec.structure
        fresh = _draw_from_cdf(rng, popularity_cdf, walking)
        current = np.where(follow, successors[current, slot], fresh)
        ranks[starts[:walking] + step] = current
    return ranks


def _distinct_sparse_ids(rng, count: int, space: int) -> np.ndarray:
    """``count`` distinct ids from [1, space] in random order, without allocating ``space``."""
    if space <= _DENSE_ID_SPACE_RATIO * count:
        return rng.permutation(space)[:count].astype(np.int64) + 1
    ids = np.zeros(0, dtype=np.int64)
    while ids.size < count:
        # Collisions are rare in a sparse space, so a few extra draws finish in one round.
        extra = count - ids.size + 16 + (count - ids.size) // 8
        drawn = np.concatenate([ids, rng.integers(1, space, size=extra, endpoint=True)])
        _, first = np.unique(drawn, return_index=True)
        ids = drawn[np.sort(first)]  # keep draw order: it is the random order
    return ids[:count]


def _zipf_cdf(num_items: int, alpha: float) -> np.ndarray:
    weights = np.arange(1, num_items + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw_from_cdf(rng, cdf: np.ndarray, size) -> np.ndarray:
    # min() guards the last bucket against cdf[-1] rounding just below a draw.
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), cdf.size - 1)


def _draw_lengths(rng, spec: SyntheticSpec) -> np.ndarray:
    if spec.length_distribution == "zipf":
        support = np.arange(spec.min_length, spec.max_length + 1, dtype=np.float64)
        cdf = np.cumsum(support**-spec.length_zipf_exponent)
        return spec.min_length + _draw_from_cdf(rng, cdf / cdf[-1], spec.num_users).astype(np.int64)
    excess_mean = spec.mean_length - spec.min_length
    if excess_mean == 0 or spec.length_sigma == 0:
        excess = np.full(spec.num_users, excess_mean)
    else:
        # A lognormal with mean excess_mean: mu = log(mean) - sigma**2 / 2.
        mu = math.log(excess_mean) - spec.length_sigma**2 / 2
        excess = rng.lognormal(mu, spec.length_sigma, size=spec.num_users)
    lengths = np.rint(spec.min_length + excess)
    return np.clip(lengths, spec.min_length, spec.max_length).astype(np.int64)


def _timestamps(rng, lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    total = int(offsets[-1])
    new_session = rng.random(total) < _NEW_SESSION_PROBABILITY
    mean_gap = np.where(new_session, _BETWEEN_SESSIONS_GAP_SECONDS, _IN_SESSION_GAP_SECONDS)
    gaps = np.maximum(1, np.rint(rng.exponential(mean_gap))).astype(np.int64)
    gaps[offsets[:-1]] = 0  # each user's first event is at its start time
    running = np.cumsum(gaps)
    since_start = running - np.repeat(running[offsets[:-1]], lengths)  # per-user cumsum
    user_start = _FIRST_START + rng.integers(0, _START_WINDOW_SECONDS, size=lengths.size)
    return np.repeat(user_start, lengths) + since_start


def _check_int(name: str, value, low: int, high: int, meaning: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"SyntheticSpec.{name} must be an integer, got {value!r}")
    _check_range(name, value, low, high, meaning)


def _check_real(name: str, value, low: float, high: float, meaning: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"SyntheticSpec.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"SyntheticSpec.{name} must be finite, got {value!r}")
    _check_range(name, value, low, high, meaning)


def _check_range(name: str, value, low, high, meaning: str | None) -> None:
    if not low <= value <= high:
        why = f" ({meaning})" if meaning else ""
        raise ValueError(
            f"SyntheticSpec.{name}={value!r} is out of range; allowed: {low} to {high}{why}"
        )
