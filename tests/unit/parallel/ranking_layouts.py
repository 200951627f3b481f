"""The tiny ranking experiments the multi-rank tests train (DLRM-HSTU and a two-channel
ULTRA-HSTU, both on synthetic impressions), on top of :func:`layouts.config`'s training,
parallel, checkpoint and logging sections."""

from __future__ import annotations

import copy
from pathlib import Path

from tests.unit.parallel.layouts import config as base_config

PLAIN = {"item": {"dim": 8}, "topic": {"dim": 4}, "segment": {"dim": 4}, "activity": {"dim": 4}}
DYNAMIC = {**PLAIN, "item": {"dim": 8, "type": "dynamic", "dynamic": {"capacity": 256, "bucket_size": 16}}}
CP = {"context_parallel_size": 2, "context_parallel_split_threshold": 8}
# 4 layers (2 per stage under PP=2), 2 heads; the default dropout (0.2) on the inputs and
# the STU layers: keyed masks, the same on every layout.
MODEL = {"type": "ranking", "num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
         "v_head_dim": 8, "max_seq_len": 32, "num_time_buckets": 32, "time_bucket_fn": "log"}
# 0.1 dropout in the tower.
RANKING = {"action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
           "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8], "dropout": 0.1},
           "output_postprocessor": "timestamp_layernorm"}
# Histories of 3 to 18 events (ULTRA's clicks: fewer), 3 candidates per request: sequences
# of 8 to 23 tokens; odd totals exercise the sequence-parallel padding (for ULTRA before
# and after truncation).
DATA = {"ranking": {"synthetic": {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3,
                                  "candidates_per_request": 3, "min_warmup_requests": 1, "max_warmup_requests": 5,
                                  "seed": 4}}}

ULTRA_CHANNELS = [
    # 4 layers: the layer after the split (2) is on the first stage under PP=2
    {"name": "imp", "num_layers": 4, "sla_k1": 6, "sla_k2": 4, "attn_truncation_split_layer": 1,
     "attn_truncation_tail_len": 5},
    # 2 layers: the split is the stage boundary; the second stage's layer truncates
    {"name": "click", "num_layers": 2, "hidden_size": 8, "qk_head_dim": 4, "v_head_dim": 4,
     "attn_truncation_split_layer": 1, "attn_truncation_tail_len": 2},
]
ULTRA_GROUPS = {
    "imp": {"item_id": "item", "item_topic": "topic"}, "imp_action": "action", "imp_watchtime": "watch_time",
    "imp_timestamp": "timestamp",
    "click": {"click_item_id": "item", "click_item_topic": "topic"}, "click_action": "click_action",
    "click_watchtime": "click_watch_time", "click_timestamp": "click_timestamp",
}


def dlrm_config(tmp: Path, name: str, *, tables: dict = PLAIN, **layout) -> dict:
    """DLRM-HSTU with ``tables`` (PLAIN or DYNAMIC) under ``layout`` (:func:`layouts.config`)."""
    return _ranking(base_config(tmp, name, **layout), MODEL, tables, RANKING)


def ultra_config(tmp: Path, name: str, *, mhc: bool = False, **layout) -> dict:
    """ULTRA-HSTU with the two ULTRA_CHANNELS (rematerialized; ``mhc``: with two
    hyper-connection streams) under ``layout``."""
    model = {**MODEL, "transducers": ULTRA_CHANNELS, "recompute_uvqk": True, "recompute_normed_x": not mhc,
             "enable_hyper_connections": mhc, "num_residual_streams": 2}
    return _ranking(base_config(tmp, name, **layout), model, PLAIN, {"features": ULTRA_GROUPS, **RANKING})


def _ranking(raw: dict, model: dict, tables: dict, ranking: dict) -> dict:
    # Copies: a caller may edit its config without touching the next one's.
    sections = copy.deepcopy({"model": model, "embeddings": tables, "ranking": ranking, "data": DATA})
    raw.update(sections)
    return raw
