"""Ranking sources: the time split, the synthetic generator's planted probabilities,
MovieLens windows with u.user features, and the impression CSV reader (malformed input is
one line naming the file, the line and what was expected)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.ranking import TEST, TRAIN, VALID, RankingSyntheticSpec, generate_ranking, split_by_time, window_samples
from megatron_gr.data.ranking.impressions import ImpressionColumns, read_impressions
from megatron_gr.data.ranking.movielens import rating_bits, read_movielens_ranking
from megatron_gr.data.ranking.synthetic import _catalogue
from megatron_gr.data.ranking.tokens import raw_id


def test_window_samples_cut_from_the_end():
    # user 0: 7 events, windows of 2 from the end: [5,7) test, [3,5) valid, [1,3) train; [0,1) too short.
    # user 1: 3 events: [1,3) test only (no room for valid with history).
    users, starts, counts, split = window_samples(np.array([0, 7, 10]), 2)
    assert users.tolist() == [0, 0, 0, 1]
    assert starts.tolist() == [1, 3, 5, 8]
    assert counts.tolist() == [2, 2, 2, 2]
    assert split.tolist() == [TRAIN, VALID, TEST, TEST]


def test_split_by_time_holds_out_each_users_latest_requests():
    users = np.array([5, 5, 9, 5, 9, 9, 5, 7])
    times = np.array([30, 10, 1, 20, 3, 2, 40, 8])
    # user 5 by time: 10, 20, 30, 40 -> train, train, valid, test; user 9: 1, 2, 3; user 7: one request.
    assert split_by_time(users, times).tolist() == [VALID, TRAIN, TRAIN, TRAIN, TEST, VALID, TEST, TRAIN]


def test_raw_ids_keep_integers_and_hash_text_stably():
    assert raw_id("123") == 123 and raw_id(" 7 ") == 7
    assert raw_id("M") == raw_id("M") != raw_id("F") and raw_id("M") >= 0


SMALL = RankingSyntheticSpec(num_users=60, num_items=40, num_topics=4, requests_per_user=4, candidates_per_request=5,
                             min_warmup_requests=1, max_warmup_requests=3, recent_window=8, seed=11)


def test_synthetic_click_probability_is_the_planted_function_of_the_history():
    """Recomputed from the sample's own history: the share of recent clicks of the
    candidate's topic, the activity and the item's quality."""
    samples = generate_ranking(SMALL)
    samples.validate()
    catalogue = _catalogue(SMALL, np.random.default_rng(SMALL.seed))
    k = SMALL.candidates_per_request
    assert samples.num_samples == SMALL.num_users * SMALL.requests_per_user
    for s in range(0, samples.num_samples, 7):
        begin, end = samples.history_begin[s], samples.history_end[s]
        assert end - begin >= SMALL.min_warmup_requests * k
        recent = slice(max(begin, end - SMALL.recent_window), end)
        clicked = (samples.events["action"][recent] & 1) == 1
        topics = samples.events["item_topic"][recent][clicked]
        items = samples.candidates["cand_item_id"][s * k : (s + 1) * k] - 1
        share = np.array([(topics == catalogue.topics[i]).sum() for i in items]) / max(clicked.sum(), 1)
        logit = (SMALL.base_logit + SMALL.activity_effect * (samples.contextual["activity"][s] - 1)
                 + SMALL.topic_affinity * share + catalogue.quality[items])
        np.testing.assert_allclose(samples.oracle["cand_action&1"][s * k : (s + 1) * k], 1 / (1 + np.exp(-logit)), rtol=1e-12)
        assert (samples.candidates["cand_item_topic"][s * k : (s + 1) * k] == catalogue.topics[items]).all()
        history_stamps = samples.events["timestamp"][begin:end]
        assert (np.diff(history_stamps) > 0).all() and history_stamps[-1] < samples.candidates["cand_timestamp"][s * k]
    actions = samples.candidates["cand_action"].astype(int)
    assert ((actions & 2) <= 2 * (actions & 1)).all()  # every like is a click
    assert (samples.split.reshape(-1, SMALL.requests_per_user) == [TRAIN, TRAIN, VALID, TEST]).all()


def test_synthetic_generator_is_deterministic_and_validates_its_spec():
    a, b = generate_ranking(SMALL), generate_ranking(SMALL)
    for name in a.candidates:
        assert np.array_equal(a.candidates[name], b.candidates[name])
    other = generate_ranking(dataclasses.replace(SMALL, seed=12))
    assert not np.array_equal(a.candidates["cand_item_id"], other.candidates["cand_item_id"])
    with pytest.raises(ValueError, match="requests_per_user=2 is out of range"):
        RankingSyntheticSpec(requests_per_user=2)
    with pytest.raises(ValueError, match="max_warmup_requests=1 is out of range: must be at least min_warmup_requests"):
        RankingSyntheticSpec(min_warmup_requests=2, max_warmup_requests=1)


def write_movielens(root, ratings: list[tuple], users: list[str]):
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (root / "u.user").write_text("".join(line + "\n" for line in users))


def test_movielens_windows_history_candidates_and_user_features(tmp_path):
    ratings = [(1, 10 + e, 1 + e % 5, 1000 + e) for e in range(7)] + [(2, 30, 4, 50), (2, 31, 2, 60), (2, 32, 5, 70)]
    write_movielens(tmp_path, ratings, ["1|24|M|technician|85711", "2|53|F|other|T8H1N"])
    samples = read_movielens_ranking(tmp_path, num_candidates=2)
    assert samples.user_ids.tolist() == [1, 1, 1, 2]
    assert samples.split.tolist() == [TRAIN, VALID, TEST, TEST]
    assert samples.history_begin.tolist() == [0, 0, 0, 7] and samples.history_end.tolist() == [1, 3, 5, 8]
    assert samples.candidates["cand_movie_id"].tolist() == [11, 12, 13, 14, 15, 16, 31, 32]
    assert samples.candidates["cand_rating"].tolist() == [2, 3, 4, 5, 1, 2, 2, 5]
    assert samples.candidates["cand_rating_bits"].tolist() == [2, 4, 8, 16, 1, 2, 2, 16]
    assert samples.events["movie_id"][:7].tolist() == list(range(10, 17))
    assert samples.contextual["age_bucket"].tolist() == [1, 1, 1, 5]  # 18-24; 50-55
    assert samples.contextual["zip_prefix"].tolist()[-1] == raw_id("T8")
    assert samples.contextual["gender"][0] == raw_id("M") and samples.contextual["gender"][3] == raw_id("F")
    assert rating_bits(np.array([1.0, 3.5, 5.0])).tolist() == [1, 8, 16]


@pytest.mark.parametrize("users, words", [
    (["1|24|M|technician"], ["u.user, line 1", "4 fields", "user id|age|gender|occupation|zip code"]),
    (["1|x|M|technician|85711"], ["u.user, line 1", "must be non-negative integers"]),
    (["1|24|M|technician|85711", "1|25|F|writer|11111"], ["line 2", "user 1 appears twice"]),
    (["2|24|M|technician|85711"], ["u.user has no line for user 1", "(1 users of the ratings are missing)"]),
])
def test_malformed_movielens_users_name_the_file_and_line(tmp_path, users, words):
    write_movielens(tmp_path, [(1, 10 + e, 3, 100 + e) for e in range(4)], users)
    with pytest.raises(DataFormatError) as caught:
        read_movielens_ranking(tmp_path, num_candidates=1)
    for word in words:
        assert word in str(caught.value)


def test_movielens_without_u_user_is_a_clear_error(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t3\t100\n1\t11\t3\t101\n")
    with pytest.raises(FileNotFoundError, match="u.user does not exist"):
        read_movielens_ranking(tmp_path, num_candidates=1)


COLUMNS = ImpressionColumns(
    user="user_id",
    contextual={"user_id": "id", "user_active_degree": "id"},
    history={"uih_seq__video_id": "id", "uih_seq__action_timestamp": "int", "uih_seq__action_weight": "int",
             "uih_seq__watch_time": "float"},
    candidates={"cand_seq__video_id": "id", "cand_seq__query_time": "int", "cand_seq__action_weight": "int"},
    candidate_timestamp="cand_seq__query_time",
)
HEADER = ("user_id,user_active_degree,uih_seq__video_id,uih_seq__action_timestamp,uih_seq__action_weight,"
          "uih_seq__watch_time,cand_seq__video_id,cand_seq__query_time,cand_seq__action_weight")


def impression_rows(*rows: str) -> str:
    return "\n".join([HEADER, *rows]) + "\n"


def test_impressions_reader_parses_sequences_and_splits_by_time(tmp_path):
    path = tmp_path / "kuairand.csv"
    path.write_text(impression_rows(
        "7,high_active,11|12|13,100|200|300,1|0|3,5.5|0|12,21|22,400|400,1|0",
        "7,high_active,11|12|13|21|22,100|200|300|400|400,1|0|3|1|0,5.5|0|12|3|0,23,500,2",
        '8,"full_active",,,,,31|32|33,50|50|60,0|0|1',
        "7,high_active,11,100,1,5.5,24,600,0",
    ))
    samples = read_impressions(path, COLUMNS)
    assert samples.user_ids.tolist() == [7, 7, 8, 7]
    assert samples.split.tolist() == [TRAIN, VALID, TRAIN, TEST]  # user 8 has one request: train only
    assert samples.history_begin.tolist() == [0, 3, 8, 8] and samples.history_end.tolist() == [3, 8, 8, 9]
    assert samples.candidate_offsets.tolist() == [0, 2, 3, 6, 7]
    assert samples.events["uih_seq__watch_time"][:3].tolist() == [5.5, 0.0, 12.0]
    assert samples.candidates["cand_seq__video_id"].tolist() == [21, 22, 23, 31, 32, 33, 24]
    assert samples.contextual["user_active_degree"].tolist() == [raw_id("high_active")] * 2 + [raw_id("full_active"), raw_id("high_active")]


@pytest.mark.parametrize("row, words", [
    ("7,high_active,11|12,100|200,1|0,5|5,21,400", ["line 2", "8 fields", "9 fields, one per header column"]),
    ("7,high_active,11|12,100,1|0,5|5,21,400,1", ["line 2", "history columns of different lengths",
                                                  "uih_seq__action_timestamp: 1", "'|'-separated values"]),
    ("7,high_active,11|12,100|2x0,1|0,5|5,21,400,1", ["line 2", "column uih_seq__action_timestamp holds '2x0'", "an integer"]),
    ("7,high_active,11,100,1,nan,21,400,1", ["column uih_seq__watch_time holds 'nan'", "a number"]),
    ("7,high_active,11,100,1,5,,,", ["line 2", "no candidates", "at least one value"]),
    ("7,high_active,11,100,1,5,21|22,400,1", ["candidate columns of different lengths"]),
])
def test_malformed_impressions_name_the_file_line_and_expectation(tmp_path, row, words):
    path = tmp_path / "bad.csv"
    path.write_text(impression_rows(row))
    with pytest.raises(DataFormatError) as caught:
        read_impressions(path, COLUMNS)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_impressions_missing_column_or_rows(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text(HEADER.replace("uih_seq__watch_time", "watch") + "\n")
    with pytest.raises(DataFormatError, match=r"column 'uih_seq__watch_time' \(named by the config\) is not in .*x.csv; its columns: user_id"):
        read_impressions(path, COLUMNS)
    path.write_text(HEADER + "\n")
    with pytest.raises(DataFormatError, match="has a header but no rows"):
        read_impressions(path, COLUMNS)
    path.write_text("")
    with pytest.raises(DataFormatError, match="is empty; expected a header line"):
        read_impressions(path, COLUMNS)


def test_real_ml100k_windows():
    from tests.conftest import ml100k_dir

    if not (ml100k_dir() / "u.data").is_file():
        pytest.skip("ML-100K not found ($MEGATRON_GR_ML100K)")
    samples = read_movielens_ranking(ml100k_dir(), num_candidates=10)
    assert samples.count("test") == 943 and samples.count("valid") == 911  # every user has >= 20 ratings
    assert int(samples.candidate_offsets[-1]) == 10 * samples.num_samples
    bits = samples.candidates["cand_rating_bits"].astype(int)
    assert ((bits & 24) != 0).mean() == pytest.approx(0.55, abs=0.01)  # rated >= 4
    assert len(np.unique(samples.contextual["occupation"])) == 21 and len(np.unique(samples.contextual["age_bucket"])) == 7
