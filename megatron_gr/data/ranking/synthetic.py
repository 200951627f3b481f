"""Synthetic ranking data with a planted preference model, so the best achievable AUC is
known.

Each item has a topic (a side feature of the data, as a video's category) and a hidden
quality q_i; each user a hidden interest mix over topics, a
noisy view of its favourite topic (``segment``) and an activity level. A user makes
requests; each request shows ``candidates_per_request`` impressions, drawn from the user's
interests (probability ``interest_share``) or from a Zipf popularity law. Whether the user
clicks impression i is planted as a known function of what the model can see::

    p_click = sigmoid(base_logit + activity_effect * (activity - 1)
                      + topic_affinity * share_recent(topic_i) + q_i)

where ``share_recent(t)`` is the fraction of the user's **clicks** among its last
``recent_window`` history events that were of topic t (0 without clicks). A click is liked
with probability sigmoid(like_logit + q_i); watch time grows with quality for clicks and is
short otherwise. Impressions join the history after their request, so interests feed back.

Every probability is a function of the sample's inputs (history items and actions,
contextual features, the candidate), so the Bayes-optimal score of a candidate is its
planted probability: the generator records it (``RankingSamples.oracle``) and evaluation
reports its AUC on the same labels (``bayes_auc``). Only the history tells which topics the
user clicked lately: a model without it (contextual + candidate features) cannot reach it.

The first requests of a user (a random number in ``[min_warmup_requests,
max_warmup_requests]``) only build history; each of the next ``requests_per_user`` is a
sample (the last is test, the one before valid, the rest train).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_gr.data.ranking.samples import TEST, TRAIN, VALID, RankingSamples

CLICK, LIKE = 1, 2
# Users start within a year of 2020-01-01 UTC; requests are hours apart; impressions of a
# request seconds apart.
_FIRST_START = 1_577_836_800
_START_WINDOW_SECONDS = 365 * 86_400
_MEAN_REQUEST_GAP_SECONDS = 6 * 3600.0
_IMPRESSION_GAP_SECONDS = 10


@dataclass(frozen=True)
class RankingSyntheticSpec:
    """What to generate; every field is checked at construction."""

    num_users: int = 3000
    """Users; raw ids 1..num_users."""
    num_items: int = 400
    """Items; raw ids 1..num_items."""
    num_topics: int = 8
    """Topics the items are split into (evenly, at random)."""
    requests_per_user: int = 6
    """Requests per user that become samples (>= 3: test, valid and at least one train)."""
    candidates_per_request: int = 8
    """Impressions shown at each request: the candidates of a sample."""
    min_warmup_requests: int = 2
    """Fewest requests that only build history before the first sample."""
    max_warmup_requests: int = 12
    """Most requests that only build history."""
    interest_concentration: float = 0.3
    """Dirichlet concentration of a user's topic mix (small: few favourite topics)."""
    interest_share: float = 0.6
    """Probability that an impression is drawn from the user's interests, not popularity."""
    recent_window: int = 32
    """History events whose clicks drive the next clicks."""
    topic_affinity: float = 4.0
    """Logit gain of a candidate whose topic had all the recent clicks."""
    quality_std: float = 0.5
    """Spread of item quality (logit)."""
    base_logit: float = -2.5
    """Click logit of an average-quality item with no recent clicks of its topic."""
    activity_effect: float = 0.5
    """Logit step between the three activity levels (a contextual feature)."""
    segment_accuracy: float = 0.5
    """Probability that ``segment`` is the user's favourite topic (else a random topic)."""
    like_logit: float = -0.5
    """Logit of a like given a click, plus the item's quality."""
    zipf_alpha: float = 0.8
    """Popularity exponent of impressions not drawn from the user's interests."""
    seed: int = 0
    """Seed of the generator; the same spec always gives the same data."""

    def __post_init__(self):
        _check_int("num_users", self.num_users, 1)
        _check_int("num_items", self.num_items, 1)
        _check_int("num_topics", self.num_topics, 1, self.num_items, "at most num_items")
        _check_int("requests_per_user", self.requests_per_user, 3)
        _check_int("candidates_per_request", self.candidates_per_request, 1)
        _check_int("min_warmup_requests", self.min_warmup_requests, 1)
        _check_int("max_warmup_requests", self.max_warmup_requests, self.min_warmup_requests, what="at least min_warmup_requests")
        _check_int("recent_window", self.recent_window, 1)
        _check_int("seed", self.seed, 0)
        for name in ("interest_share", "segment_accuracy"):
            _check_real(name, getattr(self, name), 0.0, 1.0)
        _check_real("interest_concentration", self.interest_concentration, 1e-3, 1e3)
        for name in ("topic_affinity", "quality_std", "activity_effect", "zipf_alpha"):
            _check_real(name, getattr(self, name), 0.0, 100.0)
        for name in ("base_logit", "like_logit"):
            _check_real(name, getattr(self, name), -100.0, 100.0)


def _check_int(name, value, low, high=None, what=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < low or (high is not None and value > high):
        bound = what or (f">= {low}" if high is None else f"in [{low}, {high}]")
        raise ValueError(f"{name}={value} is out of range: must be {bound}")


def _check_real(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range: must be a number in [{low}, {high}]")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class _Catalogue:
    topics: np.ndarray  # [I] topic of each item
    quality: np.ndarray  # [I]
    popularity: np.ndarray  # [I] draw probabilities
    by_topic: np.ndarray  # [I] items sorted by topic
    topic_start: np.ndarray  # [K] first position of each topic in by_topic
    topic_size: np.ndarray  # [K]


def _catalogue(spec: RankingSyntheticSpec, rng: np.random.Generator) -> _Catalogue:
    topics = rng.permutation(spec.num_items) % spec.num_topics
    quality = rng.normal(0.0, spec.quality_std, spec.num_items)
    weights = (rng.permutation(spec.num_items) + 1.0) ** -spec.zipf_alpha
    by_topic = np.argsort(topics, kind="stable")
    size = np.bincount(topics, minlength=spec.num_topics)
    return _Catalogue(topics, quality, weights / weights.sum(), by_topic, np.cumsum(size) - size, size)


def generate_ranking(spec: RankingSyntheticSpec) -> RankingSamples:
    """The samples of ``spec`` with their planted click and like probabilities.

    All users advance one request at a time together: user u's first request comes at step
    ``max_warmup_requests - warmup_u``, so every user's sample requests are the last
    ``requests_per_user`` steps.
    """
    rng = np.random.default_rng(spec.seed)
    catalogue = _catalogue(spec, rng)
    users, k, window = spec.num_users, spec.candidates_per_request, spec.recent_window
    interests = rng.dirichlet(np.full(spec.num_topics, spec.interest_concentration), size=users)  # [U, K]
    favourite = interests.argmax(axis=1)
    segment = np.where(rng.random(users) < spec.segment_accuracy, favourite, rng.integers(spec.num_topics, size=users))
    activity = rng.integers(3, size=users)
    base = spec.base_logit + spec.activity_effect * (activity - 1.0)
    warmup = rng.integers(spec.min_warmup_requests, spec.max_warmup_requests + 1, size=users)
    steps = spec.max_warmup_requests + spec.requests_per_user
    first_step = spec.max_warmup_requests - warmup
    time = _FIRST_START + rng.integers(_START_WINDOW_SECONDS, size=users)
    recent = np.full((users, window), -1, dtype=np.int64)  # clicked topic of the last events, -1: none
    columns = {name: np.zeros((steps, users, k)) for name in ("item", "action", "watch", "stamp", "p_click", "p_like")}
    for step in range(steps):
        time = time + 60 + rng.exponential(_MEAN_REQUEST_GAP_SECONDS, size=users).astype(np.int64)
        items = _impressions(rng, spec, catalogue, interests, k)  # [U, k]
        counts = (recent[:, :, None] == np.arange(spec.num_topics)).sum(axis=1)  # [U, K] recent clicks per topic
        clicks = np.maximum(counts.sum(axis=1, keepdims=True), 1)
        affinity = np.take_along_axis(counts, catalogue.topics[items], axis=1) / clicks  # share of recent clicks
        p_click = _sigmoid(base[:, None] + spec.topic_affinity * affinity + catalogue.quality[items])
        like_given_click = _sigmoid(spec.like_logit + catalogue.quality[items])
        click = rng.random((users, k)) < p_click
        like = click & (rng.random((users, k)) < like_given_click)
        watch = np.where(click, 2.0 + 6.0 * like_given_click + rng.exponential(2.0, (users, k)), rng.uniform(0.0, 1.0, (users, k)))
        active = step >= first_step  # users whose history has started
        clicked = np.where(click, catalogue.topics[items], -1)
        recent[active] = np.concatenate([recent[active], clicked[active]], axis=1)[:, -window:]
        for name, value in (("item", items + 1), ("action", click * CLICK + like * LIKE), ("watch", watch),
                            ("stamp", time[:, None] + _IMPRESSION_GAP_SECONDS * np.arange(k)),
                            ("p_click", p_click), ("p_like", p_click * like_given_click)):
            columns[name][step] = value
    return _samples(spec, columns, first_step, segment, activity, catalogue.topics.astype(np.int64))


def _samples(spec: RankingSyntheticSpec, columns: dict, first_step: np.ndarray, segment, activity, topics) -> RankingSamples:
    """Per-user event and sample columns from the ``[step, user, slot]`` draws."""
    users, k, requests = spec.num_users, spec.candidates_per_request, spec.requests_per_user
    steps = spec.max_warmup_requests + requests
    by_user = {name: np.swapaxes(values, 0, 1) for name, values in columns.items()}  # [U, steps, k]
    active = np.arange(steps)[None, :] >= first_step[:, None]  # [U, steps]
    events = {name: by_user[name][active].reshape(-1) for name in ("item", "action", "watch", "stamp")}
    history_steps = active.sum(axis=1)
    user_begin = np.concatenate([[0], np.cumsum(history_steps * k)[:-1]])
    sample_user = np.repeat(np.arange(users), requests)
    sample_rank = np.tile(np.arange(requests), users)  # 0 = the user's first sample request
    # The request's step is steps - requests + rank; its history: the user's events before it.
    sample_end = user_begin[sample_user] + (spec.max_warmup_requests - first_step[sample_user] + sample_rank) * k
    back = requests - 1 - sample_rank
    picked = {name: by_user[name][:, steps - requests :].reshape(-1) for name in columns}
    ids = sample_user + 1
    result = RankingSamples(
        user_ids=ids.astype(np.int64),
        split=np.where(back == 0, TEST, np.where(back == 1, VALID, TRAIN)).astype(np.int8),
        contextual={"user_id": ids.astype(np.int64), "segment": segment[sample_user].astype(np.int64),
                    "activity": activity[sample_user].astype(np.int64)},
        history_begin=user_begin[sample_user].astype(np.int64),
        history_end=sample_end.astype(np.int64),
        events={"item_id": events["item"].astype(np.int64), "item_topic": topics[events["item"].astype(np.int64) - 1],
                "action": events["action"].astype(np.int64),
                "watch_time": events["watch"], "timestamp": events["stamp"].astype(np.int64)},
        candidate_offsets=np.arange(users * requests + 1, dtype=np.int64) * k,
        candidates={"cand_item_id": picked["item"].astype(np.int64),
                    "cand_item_topic": topics[picked["item"].astype(np.int64) - 1],
                    "cand_timestamp": picked["stamp"].astype(np.int64),
                    "cand_action": picked["action"], "cand_watch_time": picked["watch"]},
        oracle={
            f"cand_action&{CLICK}": picked["p_click"],
            f"cand_action&{LIKE}": picked["p_like"],
            f"cand_action&{CLICK | LIKE}": picked["p_click"],  # every like is a click
        },
    )
    result.validate()
    return result


def _impressions(rng, spec: RankingSyntheticSpec, catalogue: _Catalogue, interests: np.ndarray, k: int) -> np.ndarray:
    """``[U, k]`` item indices shown at one request of every user."""
    users = interests.shape[0]
    popular = rng.choice(spec.num_items, size=(users, k), p=catalogue.popularity)
    cumulative = np.cumsum(interests, axis=1)
    draw = rng.random((users, k)) * cumulative[:, -1:]
    topic = np.minimum((draw[:, :, None] >= cumulative[:, None, :]).sum(axis=2), spec.num_topics - 1)
    within = np.floor(rng.random((users, k)) * catalogue.topic_size[topic]).astype(np.int64)
    from_interests = catalogue.by_topic[catalogue.topic_start[topic] + within]
    return np.where(rng.random((users, k)) < spec.interest_share, from_interests, popular)
