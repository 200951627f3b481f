"""The columns each built-in ranking source provides, per feature group, so a config that
names another column fails before any data is read. (An impression CSV provides whatever
its header names; its reader checks the columns.)"""

from __future__ import annotations

SYNTHETIC_COLUMNS = {
    "contextual": ("user_id", "segment", "activity"),
    "uih": ("item_id", "item_topic"),
    "uih_action": ("action",),
    "uih_watchtime": ("watch_time",),
    "uih_timestamp": ("timestamp",),
    "candidate": ("cand_item_id", "cand_item_topic"),
    "candidate_timestamp": ("cand_timestamp",),
    "labels": ("cand_action", "cand_watch_time"),
}

MOVIELENS_COLUMNS = {
    "contextual": ("user_id", "age_bucket", "gender", "occupation", "zip_prefix"),
    "uih": ("movie_id",),
    "uih_action": ("rating_bits",),
    "uih_watchtime": (),
    "uih_timestamp": ("timestamp",),
    "candidate": ("cand_movie_id",),
    "candidate_timestamp": ("cand_timestamp",),
    "labels": ("cand_rating_bits", "cand_rating"),
}

SOURCE_COLUMNS = {"synthetic": SYNTHETIC_COLUMNS, "movielens": MOVIELENS_COLUMNS}
