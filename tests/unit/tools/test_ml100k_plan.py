"""tools/benchmarks/ml100k_plan.py: overrides, the combination of what helped on validation,
the choice, and the tables, on made-up results (no training runs)."""

from __future__ import annotations

from tests.unit.tools.benchmark_tools import load_benchmark

plan_module = load_benchmark("ml100k_plan")
ModelPlan = plan_module.ModelPlan

PLAN = ModelPlan(
    "toy", "configs/hstu_ml100k.yaml", ("model.a=1", "model.b=1"),
    {"a2": ("model.a=2",), "a3": ("model.a=3",), "c": ("model.c=1",), "bd": ("model.b=0", "model.d=1"), "e": ("model.e=1",)},
)


def test_a_variant_replaces_the_keys_it_sets():
    assert plan_module.overrides_of(PLAN, "base") == ("model.a=1", "model.b=1")
    assert plan_module.overrides_of(PLAN, "a2") == ("model.b=1", "model.a=2")
    assert plan_module.overrides_of(PLAN, "bd") == ("model.a=1", "model.b=0", "model.d=1")


def test_combination_takes_every_variant_that_helped_and_the_better_of_a_clash():
    # a2 and a3 both helped and both set model.a: a3 (better) wins; c helped; bd and e did not.
    scores = {"base": 0.050, "a2": 0.055, "a3": 0.060, "c": 0.052, "bd": 0.049, "e": 0.050}
    overrides, used = plan_module.combined_overrides(PLAN, scores)
    assert used == ["a3", "c"]
    assert overrides == ("model.b=1", "model.a=3", "model.c=1")


def test_nothing_helped_nothing_combined():
    overrides, used = plan_module.combined_overrides(PLAN, {"base": 0.05, "a2": 0.04, "c": 0.05})
    assert used == [] and overrides == PLAN.base


def test_choice_is_the_best_mean_validation_score_first_on_ties():
    assert plan_module.choose({"base": 0.05, "a3": 0.06, "combined": 0.058}) == "a3"
    assert plan_module.choose({"base": 0.05, "c": 0.05}) == "base"


def _record(config, seed, valid, test):
    metrics = lambda v: {m: v for m in plan_module.METRICS}  # noqa: E731
    return {"config_name": config, "seed": seed, "changes": [] if config == "base" else ["model.a=2"],
            "valid": metrics(valid), "test": metrics(test), "best_step": 100, "stopped_step": 400, "wall_s": 60.0}


def test_tables_show_per_seed_values_means_and_the_choice():
    runs = {"base": [_record("base", 202, 0.05, 0.04), _record("base", 101, 0.07, 0.06)],
            "a2": [_record("a2", 101, 0.08, 0.07), _record("a2", 202, 0.06, 0.05)]}
    search = plan_module.search_table(PLAN, runs, "a2")
    assert "seeds 101, 202" in search
    assert "| base | — | 0.0700, 0.0500 | 0.0600 | +0.0000 |" in search
    assert "| a2 **(chosen)** | model.a=2 | 0.0800, 0.0600 | 0.0700 | +0.0100 |" in search
    summary = plan_module.summary_table({"toy": runs["a2"]})
    assert "| toy | test | 2 | 0.0600 ± 0.0141 |" in summary
