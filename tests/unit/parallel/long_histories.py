"""Long-history scenarios for context parallelism: histories of 2k-8k tokens (max_seq_len
8192) beside short ones, tiny widths, dropout off, one optimizer step.

- ``sla``: users of 26, 54, 129, 1051, 2406 and 2918 tokens in two micro-batches of three,
  each mixing sequences split over the ranks (longer than the threshold of 1024) with whole
  ones; two layers, semi-local attention (window 64, global prefix 100), the relative
  position and time bias, the ``seq_len`` normaliser.
- ``window``: users of 35, 45, 155, 500, 1240 and 8192 tokens, one micro-batch each (the
  8192 and 1240 ones split; a whole short sequence leaves the other rank without a token);
  one layer, a local window of 300 (max_attn_len), the ``max_seq_len`` normaliser, no bias
  (the reference's bias buckets at 8192 x 8192 would cost more than all the rest).

The single-rank reference pads every micro-batch to its longest sequence, so these
histories cost O(L^2) memory and time there: seconds per layer at 8192 on one core.
"""

from __future__ import annotations

from pathlib import Path

MODEL = {"hidden_size": 8, "num_attention_heads": 2, "qk_head_dim": 4, "v_head_dim": 4, "max_seq_len": 8192,
         "hidden_dropout": 0.0, "embedding_dropout": 0.0, "num_negatives": 16, "num_in_batch_negatives": 8}
# The synthetic seeds give the lengths above (tokens: a user's events less the two held
# out and the last label, at most max_seq_len).
VARIANTS = {
    "sla": dict(model={"num_layers": 2, "sla_k1": 64, "sla_k2": 100, "attention_normalizer": "seq_len"},
                seed=2, micro_batch_size=3),
    "window": dict(model={"num_layers": 1, "max_attn_len": 300, "relative_attention_bias": False},
                   seed=9, micro_batch_size=1),
}
SPLIT_THRESHOLD = 1024


def long_config(tmp: Path, name: str, variant: str, **parallel) -> dict:
    spec = VARIANTS[variant]
    return {
        "model": {**MODEL, **spec["model"]},
        "data": {"synthetic": {"num_users": 6, "num_items": 200, "min_length": 8, "mean_length": 2500.0,
                               "max_length": 8200, "length_sigma": 1.6, "seed": spec["seed"]}},
        "training": {"train_iters": 1, "micro_batch_size": spec["micro_batch_size"], "global_batch_size": 6,
                     "lr": 3e-3, "lr_warmup_iters": 0, "eval_interval": 0, "device": "cpu"},
        "parallel": {"micro_batch_balance": "attention_cost", "context_parallel_split_threshold": SPLIT_THRESHOLD,
                     **parallel},
        "logging": {"progress": "off", "metrics_file": str(tmp / f"{name}.jsonl")},
    }


def long_scenario(tmp: Path, name: str, variant: str, **parallel) -> dict:
    return {"name": name, "config": long_config(tmp, name, variant, **parallel), "steps": 1}
