"""tools/benchmarks/fp8_linear_host.py: a tiny run reports every recipe, and the FP8 linears
stay within a budget of top-level aten operators per forward + backward (issue 14: host
work; the budgets sit below what each recipe dispatched before it was cut: 81, 111, 125)."""

from __future__ import annotations

import math
import types

import torch

from tests.unit.tools.benchmark_tools import load_benchmark

TOP_LEVEL_BUDGET = {"tensorwise": 64, "delayed": 84, "rowwise": 97}


def _tool() -> types.ModuleType:
    return load_benchmark("fp8_linear_host")


def test_each_recipe_reports_ops_and_times_within_budget(tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = _tool().main(["--warmup", "3", "--repeats", "2", "--rounds", "1", "--json", str(tmp_path / "host.json")])
    finally:  # main() times on one thread; the tests after this one run on the session's count
        torch.set_num_threads(threads)
    by_recipe = {row["recipe"]: row for row in rows}
    assert set(by_recipe) == {"plain", *TOP_LEVEL_BUDGET}
    for row in rows:
        assert row["aten_ops"] >= row["top_level_aten_ops"] > 0, row
        assert math.isfinite(row["wall_us"]) and row["wall_us"] > 0 and row["cpu_us"] > 0, row
    for recipe, budget in TOP_LEVEL_BUDGET.items():
        row = by_recipe[recipe]
        assert by_recipe["plain"]["top_level_aten_ops"] < row["top_level_aten_ops"] <= budget, row
    assert (tmp_path / "host.json").read_text().count('"recipe"') == 4
