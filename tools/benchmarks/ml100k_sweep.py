#!/usr/bin/env python3
"""HSTU and SASRec on ML-100K, searched and compared under one protocol: the plan of
``ml100k_plan.py`` (one-at-a-time variants on validation, the combination of what helped,
then the chosen config on five seeds), run as many training processes in parallel.

    # the whole study on one GPU machine (each small run is host-bound: ~14 at a time)
    python tools/benchmarks/ml100k_sweep.py --data-path ../shared/data/ml-100k --out runs/ml100k --jobs 14

    # a tiny end-to-end check on a CPU (a few steps per run)
    python tools/benchmarks/ml100k_sweep.py --data-path ../shared/data/ml-100k --out /tmp/sweep --jobs 2 \\
        --max-variants 1 --search-seeds 1 --final-seeds 1,2 -- \\
        --device cpu --train-iters 4 --eval-interval 2 --lr-warmup-iters 0

Writes ``OUT/runs.jsonl`` (one line per run: model, config, stage, seed, overrides, best
step, valid/test metrics of the best validation weights, wall time), ``OUT/summary.md``
(the tables, also printed) and ``OUT/choice.json`` (the chosen overrides per model). Runs
already in ``runs.jsonl`` are not repeated, so an interrupted study resumes. Arguments after
``--`` go to every ``megatron-gr pretrain`` command (before the plan's ``--set``s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ml100k_plan as plan_module  # noqa: E402  (a sibling script, not a package)
from ml100k_plan import PLANS, ModelPlan  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    model: str
    config_name: str
    stage: str  # search, combined or final
    seed: int
    overrides: tuple[str, ...]
    changes: tuple[str, ...]  # what differs from the model's base, for the tables

    @property
    def key(self) -> tuple:
        return (self.model, self.config_name, self.seed, self.overrides)


def run_training(run: Run, args, extra: list[str]) -> dict:
    """One ``megatron-gr pretrain`` process; its record for ``runs.jsonl``."""
    out = Path(args.out) / run.model / f"{run.config_name}_s{run.seed}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "megatron_gr.cli", "pretrain", "--config", str(REPO / PLANS[run.model].config),
        "--data-path", args.data_path, "--seed", str(run.seed), "--metrics-file", str(metrics), "--progress", "off",
        *extra,
    ]
    for item in run.overrides:
        command += ["--set", item]
    # One thread per process: the machine's cores go to parallel runs, not to OpenMP teams.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{run.model} {run.config_name} seed {run.seed} failed (exit {code}); log: {out / 'log.txt'}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    valid = [r for r in records if r.get("split") == "valid"][-1]  # the final record: best weights
    test = [r for r in records if r.get("split") == "test"][-1]
    steps = [r["step"] for r in records if "loss" in r]
    return {
        "model": run.model, "config_name": run.config_name, "stage": run.stage, "seed": run.seed,
        "overrides": list(run.overrides), "changes": list(run.changes),
        "best_step": valid["step"], "stopped_step": steps[-1] if steps else 0,
        "valid": {m: valid[m] for m in plan_module.METRICS}, "test": {m: test[m] for m in plan_module.METRICS},
        "wall_s": wall,
    }


class ModelStudy:
    """One model's progress through the stages; ``next_runs`` is called when every run of
    the current stage has finished."""

    def __init__(self, plan: ModelPlan, *, max_variants: int, search_seeds, final_seeds):
        self.plan = plan
        self.variants = list(plan.variants)[:max_variants] if max_variants >= 0 else list(plan.variants)
        self.search_seeds, self.final_seeds = tuple(search_seeds), tuple(final_seeds)
        self.stage = None
        self.configs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}  # name -> overrides, changes
        self.chosen = None

    def first_runs(self) -> list[Run]:
        self.stage = "search"
        self.configs["base"] = (self.plan.base, ())
        for name in self.variants:
            self.configs[name] = (plan_module.overrides_of(self.plan, name), self.plan.variants[name])
        return [self._run(name, seed) for name in self.configs for seed in self.search_seeds]

    def next_runs(self, results: dict) -> list[Run]:
        scores = self.scores(results)
        if self.stage == "search":
            searched = ModelPlan(self.plan.name, self.plan.config, self.plan.base, {v: self.plan.variants[v] for v in self.variants})
            overrides, used = plan_module.combined_overrides(searched, scores)
            if len(used) >= 2:
                self.stage = "combined"
                self.configs["combined"] = (overrides, tuple(used))
                return [self._run("combined", seed) for seed in self.search_seeds]
            self.stage = "combined"  # nothing new to combine: straight to the final seeds
            return self.next_runs(results)
        if self.stage == "combined":
            self.stage = "final"
            self.chosen = plan_module.choose(scores)
            return [self._run(self.chosen, seed, stage="final") for seed in self.final_seeds]
        self.stage = "done"
        return []

    def scores(self, results: dict) -> dict[str, float]:
        return {name: plan_module.mean_metric(self.runs_of(name, results, self.search_seeds)) for name in self.configs
                if all(self._run(name, s).key in results for s in self.search_seeds)}

    def runs_of(self, name: str, results: dict, seeds) -> list[dict]:
        return [results[self._run(name, seed).key] for seed in seeds]

    def _run(self, name: str, seed: int, stage: str = None) -> Run:
        overrides, changes = self.configs[name]
        stage = stage or ("combined" if name == "combined" else "search")
        return Run(self.plan.name, name, stage, seed, overrides, changes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=1, help="training processes at a time")
    parser.add_argument("--models", default=",".join(PLANS), help="comma-separated: hstu, sasrec")
    parser.add_argument("--search-seeds", default=",".join(map(str, plan_module.SEARCH_SEEDS)))
    parser.add_argument("--final-seeds", default=",".join(map(str, plan_module.FINAL_SEEDS)))
    parser.add_argument("--max-variants", type=int, default=-1, help="only the first N variants per model (checks)")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "runs.jsonl"
    results = {}
    if log_path.exists():  # resume: finished runs are kept
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            results[(r["model"], r["config_name"], r["seed"], tuple(r["overrides"]))] = r
    studies = {
        name: ModelStudy(PLANS[name], max_variants=args.max_variants,
                         search_seeds=[int(s) for s in args.search_seeds.split(",")],
                         final_seeds=[int(s) for s in args.final_seeds.split(",")])
        for name in args.models.split(",")
    }
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending: dict[Future, Run] = {}
        waiting = {name: [] for name in studies}  # runs of each model's current stage

        def submit(name: str, runs: list[Run]) -> None:
            while True:
                waiting[name] = [r for r in runs if r.key not in results]
                for run in waiting[name]:
                    pending[pool.submit(run_training, run, args, extra)] = run
                if waiting[name] or studies[name].stage == "done":
                    return
                runs = studies[name].next_runs(results)  # every run of this stage is on record

        for name, study in studies.items():
            submit(name, study.first_runs())
        with open(log_path, "a") as log:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    run = pending.pop(future)
                    if future.exception() is not None:  # a failed run stops the study (its log path)
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise future.exception()
                    record = future.result()
                    results[run.key] = record
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    print(f"[{time.perf_counter() - start:6.0f}s] {run.model:6s} {run.stage:8s} {run.config_name:22s} "
                          f"seed {run.seed:5d}: valid NDCG@10 {record['valid']['ndcg@10']:.4f} "
                          f"test NDCG@10 {record['test']['ndcg@10']:.4f} ({record['wall_s']:.0f}s)", flush=True)
                    waiting[run.model] = [r for r in waiting[run.model] if r.key != run.key]
                    if not waiting[run.model]:
                        submit(run.model, studies[run.model].next_runs(results))
    summary = summarize(studies, results)
    (out / "summary.md").write_text(summary + "\n")
    choice = {name: {"config": s.chosen, "overrides": list(s.configs[s.chosen][0])} for name, s in studies.items()}
    (out / "choice.json").write_text(json.dumps(choice, indent=1) + "\n")
    print(summary)
    print(f"\n{len(results)} runs on record; this invocation took {time.perf_counter() - start:.0f} s")
    return 0


def summarize(studies: dict[str, ModelStudy], results: dict) -> str:
    parts, finals = [], {}
    for name, study in studies.items():
        runs = {c: study.runs_of(c, results, study.search_seeds) for c in study.configs}
        parts.append(plan_module.search_table(study.plan, runs, study.chosen))
        finals[name] = study.runs_of(study.chosen, results, study.final_seeds)
        parts.append(plan_module.final_table(study.plan, finals[name]))
    parts.append(plan_module.summary_table(finals))
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
