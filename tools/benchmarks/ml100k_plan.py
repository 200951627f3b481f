"""The ML-100K search plan of ``ml100k_sweep.py``: what is varied, on which seeds, how the
configuration is chosen (validation only), and the markdown tables. Pure functions, no runs.

Per model (HSTU, SASRec), fixed before any run:

1. search: the base and every one-at-a-time variant, each on ``SEARCH_SEEDS``;
2. combined: the base plus every variant whose mean validation NDCG@10 beat the base's (the
   better one where two change the same key), on ``SEARCH_SEEDS`` (skipped when fewer than
   two variants helped: it would repeat a searched config);
3. final: the config of the best mean validation NDCG@10 among base, variants and combined,
   on ``FINAL_SEEDS``; its test metrics are the reported result.

Both models get the same budget: as many variants (11), the same seeds and the same training
settings (batch, steps, early stopping, evaluation). At most 2 x (24 + 2 + 5) = 62 runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SELECTION_METRIC = "ndcg@10"
SEARCH_SEEDS = (101, 202)
FINAL_SEEDS = (1234, 7, 11, 22, 33)
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")

# The fidelity options at their HSTU-paper / reference values (each variant below turns one
# back, which measures it). The rest is configs/hstu_ml100k.yaml, which holds the study's
# choice since its run: the bases pin the study's starting point, so it reruns as recorded.
HSTU_BASE = (
    "model.time_feature=until_query",
    "model.time_bias_origin=query",
    "model.time_bucket_fn=hstu_log",
    "model.retrieval_loss=full_softmax",
    "data.train_windows=all",
    "model.scale_item_embeddings=true",
)
SASREC_BASE = ("model.hidden_size=64", "model.ffn_hidden_size=256")
HSTU_VARIANTS = {
    "time_since_previous": ("model.time_feature=since_previous",),
    "no_time_feature": ("model.time_feature=none",),
    "time_bias_token": ("model.time_bias_origin=token",),
    "sqrt_time_buckets": ("model.time_bucket_fn=sqrt",),
    "sampled_softmax": ("model.retrieval_loss=sampled_softmax",),
    "latest_windows": ("data.train_windows=latest",),
    "positions_from_end": ("model.position_encoding=from_end",),
    "unscaled_items": ("model.scale_item_embeddings=false",),
    "alpha_1": ("model.attention_alpha=1.0",),
    "temperature_0.05": ("model.softmax_temperature=0.05",),
    "cosine_lr": ("training.lr_decay_style=cosine", "training.lr_decay_iters=2000", "training.min_lr=1.0e-4"),
}

# SASRec as RecBole trains it (configs/sasrec_ml100k.yaml): every event a label, full
# softmax over the corpus, raw dot products.
SASREC_VARIANTS = {
    "heads_2": ("model.num_attention_heads=2",),
    "layers_1": ("model.num_layers=1",),
    "layers_3": ("model.num_layers=3",),
    "hidden_128": ("model.hidden_size=128", "model.ffn_hidden_size=512"),
    "dropout_0.2": ("model.hidden_dropout=0.2", "model.embedding_dropout=0.2", "model.attention_dropout=0.2"),
    "lr_2e-3": ("training.lr=2.0e-3",),
    "cosine_t0.1": ("model.output_normalization=l2", "model.softmax_temperature=0.1"),
    "cosine_t0.05": ("model.output_normalization=l2", "model.softmax_temperature=0.05"),
    "scaled_items": ("model.scale_item_embeddings=true",),
    "latest_windows": ("data.train_windows=latest",),
    "cosine_lr": ("training.lr_decay_style=cosine", "training.lr_decay_iters=2000", "training.min_lr=1.0e-4"),
}


@dataclass(frozen=True)
class ModelPlan:
    name: str
    config: str  # path under the repository root
    base: tuple[str, ...]
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)


PLANS = {
    "hstu": ModelPlan("hstu", "configs/hstu_ml100k.yaml", HSTU_BASE, HSTU_VARIANTS),
    "sasrec": ModelPlan("sasrec", "configs/sasrec_ml100k.yaml", SASREC_BASE, SASREC_VARIANTS),
}


def overrides_of(plan: ModelPlan, variant: str) -> tuple[str, ...]:
    """The ``--set`` overrides of ``variant`` (``base`` or a variant name) on the plan's config."""
    if variant == "base":
        return plan.base
    return _merge(plan.base, plan.variants[variant])


def _merge(base: tuple[str, ...], changes: tuple[str, ...]) -> tuple[str, ...]:
    """``base`` with every key of ``changes`` set to the value in ``changes``."""
    keys = {c.split("=", 1)[0] for c in changes}
    return tuple(b for b in base if b.split("=", 1)[0] not in keys) + tuple(changes)


def mean_metric(runs: list[dict], metric: str = SELECTION_METRIC, split: str = "valid") -> float:
    return statistics.fmean(r[split][metric] for r in runs)


def combined_overrides(plan: ModelPlan, scores: dict[str, float]) -> tuple[tuple[str, ...], list[str]]:
    """The base plus every variant that beat it (``scores``: mean validation metric per
    config, ``base`` included); of variants that change a common key, the better one.
    Returns the overrides and the variants used (fewer than two: nothing new to run)."""
    base_score = scores["base"]
    helped = sorted((v for v in plan.variants if scores.get(v, float("-inf")) > base_score), key=lambda v: -scores[v])
    used, keys = [], set()
    for variant in helped:
        variant_keys = {c.split("=", 1)[0] for c in plan.variants[variant]}
        if variant_keys & keys:
            continue
        used.append(variant)
        keys |= variant_keys
    overrides = plan.base
    for variant in used:
        overrides = _merge(overrides, plan.variants[variant])
    return overrides, used


def choose(scores: dict[str, float]) -> str:
    """The config of the best mean validation metric (ties: the first in ``scores``)."""
    return max(scores, key=lambda name: (scores[name], -list(scores).index(name)))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def search_table(plan: ModelPlan, runs_by_config: dict[str, list[dict]], chosen: str) -> str:
    """Markdown: one row per searched config (runs carry ``changes``, their overrides on top
    of the base), validation NDCG@10 per seed and its mean."""
    base = mean_metric(runs_by_config["base"])
    seeds = sorted(r["seed"] for r in runs_by_config["base"])
    lines = [
        f"### {plan.name}: search (seeds {', '.join(map(str, seeds))}, validation NDCG@10)",
        "",
        "| config | changes from base | valid NDCG@10 per seed | mean | vs base | valid HR@10 | best step | wall (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in runs_by_config.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        mean = mean_metric(runs)
        per_seed = ", ".join(f"{r['valid'][SELECTION_METRIC]:.4f}" for r in runs)
        changes = "; ".join(runs[0]["changes"]) or "—"
        mark = " **(chosen)**" if name == chosen else ""
        best_step = statistics.fmean(r["best_step"] for r in runs)
        wall = statistics.fmean(r["wall_s"] for r in runs)
        lines.append(
            f"| {name}{mark} | {changes} | {per_seed} | {mean:.4f} | {mean - base:+.4f} | "
            f"{mean_metric(runs, 'hr@10'):.4f} | {best_step:.0f} | {wall:.0f} |"
        )
    return "\n".join(lines)


def final_table(plan: ModelPlan, runs: list[dict]) -> str:
    """Markdown: the chosen config on the final seeds, per seed and mean ± std."""
    runs = sorted(runs, key=lambda r: FINAL_SEEDS.index(r["seed"]) if r["seed"] in FINAL_SEEDS else r["seed"])
    lines = [
        f"### {plan.name}: final seeds, config `{runs[0]['config_name']}`",
        "",
        "| seed | best step | stopped at | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 | wall (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['seed']} | {r['best_step']} | {r['stopped_step']} | {r['valid']['ndcg@10']:.4f} | "
            f"{r['valid']['hr@10']:.4f} | {r['test']['ndcg@10']:.4f} | {r['test']['hr@10']:.4f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def summary_table(finals: dict[str, list[dict]]) -> str:
    """Markdown: mean ± std over the final seeds of every metric, valid and test, per model."""
    lines = [
        "### test (valid) metrics of the chosen configs, mean ± std over the final seeds",
        "",
        "| model | split | runs | " + " | ".join(m.replace("hr", "HR").replace("ndcg", "NDCG").replace("mrr", "MRR") for m in METRICS) + " |",
        "| --- | --- | ---: | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for model, runs in finals.items():
        for split in ("test", "valid"):
            cells = " | ".join(_mean_std([r[split][m] for r in runs]) for m in METRICS)
            lines.append(f"| {model} | {split} | {len(runs)} | {cells} |")
    return "\n".join(lines)
