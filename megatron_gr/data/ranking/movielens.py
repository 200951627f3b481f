"""MovieLens ranking samples: per user, the next ``k`` ratings are the candidates and every
earlier rating the history (``window_samples``: the last window is test, the one before it
valid, earlier windows train), with the user's ``u.user`` line as contextual features.

Columns (feature names for ``ranking.features``):

=====================  =====================================================================
contextual             ``user_id``, ``age_bucket`` (under 18, 18-24, 25-34, 35-44, 45-49,
                       50-55, 56+: 0..6), ``gender``, ``occupation``, ``zip_prefix`` (first
                       two characters of the zip code)
history                ``movie_id``, ``rating_bits`` (bit ``2^(r-1)`` for a rating of r
                       stars), ``timestamp``
candidates             ``cand_movie_id``, ``cand_timestamp``
labels                 ``cand_rating_bits`` (bits as above: ``bitmask: 24`` is "rated >= 4"),
                       ``cand_rating`` (the rating, for regression)
=====================  =====================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_gr.data.errors import DataFormatError, line_error
from megatron_gr.data.movielens import find_ratings_file, read_movielens
from megatron_gr.data.ranking.samples import RankingSamples, window_samples
from megatron_gr.data.ranking.tokens import raw_id
from megatron_gr.data.sequences import UserSequences

AGE_BUCKET_UPPER_BOUNDS = (18, 25, 35, 45, 50, 56)  # a bucket holds ages below its bound
USER_FILE = "u.user"


def rating_bits(ratings: np.ndarray) -> np.ndarray:
    """One action bit per star: 2^(r - 1) for a rating of r (half stars round up)."""
    stars = np.clip(np.ceil(np.asarray(ratings, dtype=np.float64) - 1e-9), 1, 5).astype(np.int64)
    return np.left_shift(1, stars - 1)


def read_users(path: str | os.PathLike) -> dict[int, tuple[int, int, int, int]]:
    """``u.user`` -> {user id: (age bucket, gender, occupation, zip prefix) as raw ids}."""
    users = {}
    expected = "user id|age|gender|occupation|zip code, e.g. 1|24|M|technician|85711"
    with open(path, encoding="latin-1") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            fields = text.split("|")
            if len(fields) != 5:
                raise line_error(path, number, text, f"{len(fields)} fields", expected)
            user, age, gender, occupation, zip_code = (field.strip() for field in fields)
            if not user.isdigit() or not age.isdigit():
                raise line_error(path, number, text, "the user id and the age must be non-negative integers", expected)
            if not gender or not occupation or not zip_code:
                raise line_error(path, number, text, "an empty field", expected)
            if int(user) in users:
                raise line_error(path, number, text, f"user {user} appears twice", "one line per user")
            bucket = int(np.searchsorted(AGE_BUCKET_UPPER_BOUNDS, int(age), side="right"))
            users[int(user)] = (bucket, raw_id(gender), raw_id(occupation), raw_id(zip_code[:2]))
    return users


def user_file(path: str | os.PathLike) -> Path:
    """``u.user`` beside the ratings file that ``path`` names or holds."""
    ratings, _ = find_ratings_file(path)
    found = ratings.parent / USER_FILE
    if not found.is_file():
        raise FileNotFoundError(
            f"{found} does not exist: MovieLens ranking reads the users' features from {USER_FILE} "
            "beside the ratings (ML-100K ships it)"
        )
    return found


def read_movielens_ranking(path: str | os.PathLike, *, num_candidates: int) -> RankingSamples:
    """Ranking samples of the MovieLens release in ``path`` with ``num_candidates``
    candidates each (DataFormatError/FileNotFoundError on bad input)."""
    sequences = UserSequences.from_events(read_movielens(path))
    users_file = user_file(path)
    features = read_users(users_file)
    missing = [int(u) for u in sequences.user_ids if int(u) not in features]
    if missing:
        raise DataFormatError(
            f"{users_file} has no line for user {missing[0]} ({len(missing)} users of the ratings are missing); "
            "expected a line for every user who rated"
        )
    user_index, starts, counts, split = window_samples(sequences.offsets, num_candidates)
    if user_index.size == 0:
        raise DataFormatError(
            f"no user of {path} has more than {num_candidates} ratings: a sample needs history before its "
            f"{num_candidates} candidates; lower data.ranking.num_candidates"
        )
    raw_users = sequences.user_ids[user_index]
    table = np.array([features[int(u)] for u in raw_users], dtype=np.int64).reshape(-1, 4)
    movie_ids = sequences.item_vocab[sequences.item_ids]
    bits = rating_bits(sequences.ratings)
    candidate_index = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    samples = RankingSamples(
        user_ids=raw_users,
        split=split,
        contextual={
            "user_id": raw_users,
            "age_bucket": table[:, 0],
            "gender": table[:, 1],
            "occupation": table[:, 2],
            "zip_prefix": table[:, 3],
        },
        history_begin=sequences.offsets[user_index],
        history_end=starts,
        events={"movie_id": movie_ids, "rating_bits": bits, "timestamp": sequences.timestamps},
        candidate_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        candidates={
            "cand_movie_id": movie_ids[candidate_index],
            "cand_timestamp": sequences.timestamps[candidate_index],
            "cand_rating_bits": bits[candidate_index].astype(np.float64),
            "cand_rating": sequences.ratings[candidate_index].astype(np.float64),
        },
    )
    samples.validate()
    return samples
