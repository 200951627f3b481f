#!/usr/bin/env python3
"""Ranking quality of DLRM-HSTU against baselines trained and evaluated the same way.

    # synthetic: DLRM-HSTU vs the same network without history tokens, beside the Bayes AUC
    python tools/benchmarks/ranking_quality.py synthetic --out runs/rq_synthetic [--seeds 1234] [--jobs 2]
    # ML-100K (rated >= 4): DLRM-HSTU, the non-sequential MLP and popularity, 3 seeds
    python tools/benchmarks/ranking_quality.py ml100k --data-path ../shared/data/ml-100k --out runs/rq_ml100k \
        [--seeds 1234 1235 1236] [--jobs 3]

Every trained variant is ``megatron-gr pretrain`` on the dataset's config
(``configs/dlrm_hstu_<dataset>.yaml``) in its own process (``--jobs`` at a time): test
metrics of the best validation AUC weights. ``no_history`` sets
``ranking.use_history=false``: contextual and candidate features only, the same tower,
losses and training (a non-sequential model on the same features). ``popularity`` (ML-100K)
scores a candidate by its movie's number of ratings outside the valid and test windows
(deterministic: its std over seeds is 0). Prints a markdown table of mean +- std over seeds
and writes every run's metrics to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {"dlrm_hstu": [], "no_history": ["ranking.use_history=false"]}
METRICS = ("auc", "gauc", "bayes_auc")


def train(dataset: str, variant: str, seed: int, out: Path, extra: list[str]) -> dict:
    """Test metrics of one training run (its own process)."""
    run = out / f"{variant}_seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--config", str(REPO / f"configs/dlrm_hstu_{dataset}.yaml"),
               "--seed", str(seed), "--progress", "off", "--metrics-file", str(run / "metrics.jsonl"), *extra]
    for override in VARIANTS[variant]:
        command += ["--set", override]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(run / "log.txt", "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed: see {run / 'log.txt'}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r.get("split") == "test"][-1]
    valid = [r for r in records if r.get("split") == "valid"]
    return {"variant": variant, "seed": seed, "best_step": test["step"], "valid_evaluations": len(valid),
            **{key: value for key, value in test.items() if key not in ("step", "split")}}


def popularity(data_path: str) -> dict:
    """Test AUC / GAUC of scoring each candidate by its movie's count among the ratings a
    model may train on (every rating but the valid and test candidates)."""
    from megatron_gr.config import resolve_config
    from megatron_gr.data.ranking import TEST, VALID
    from megatron_gr.models.ranking.metrics import auc, grouped_auc
    from megatron_gr.models.registry import get_train_spec

    config = resolve_config(str(REPO / "configs/dlrm_hstu_ml100k.yaml"), [(["data", "path"], data_path)])
    data = get_train_spec("ranking").build_dataset(config).data
    samples = data.samples
    per_candidate = np.repeat(samples.split, samples.num_candidates)
    movies = data.candidate_ids[:, 0]
    counts = np.bincount(data.history_ids[:, 0], minlength=movies.max() + 1)  # every rating is an event
    held_out = np.isin(per_candidate, (VALID, TEST))
    counts -= np.bincount(movies[held_out], minlength=counts.size)
    test = per_candidate == TEST
    labels, users = data.labels[test, 0], np.repeat(samples.user_ids, samples.num_candidates)[test]
    scores = counts[movies[test]].astype(np.float64)
    return {"variant": "popularity", "seed": None, "auc": auc(scores, labels), "gauc": grouped_auc(scores, labels, users).value}


def bayes_sampling_error(draws: int = 500) -> dict:
    """The test Bayes AUC of the default synthetic data and its spread over label redraws:
    labels drawn again from the planted probabilities ``draws`` times (Monte Carlo), the
    oracle's AUC on each; the std says how far a perfect model's AUC moves by chance."""
    from megatron_gr.config import resolve_config
    from megatron_gr.data.ranking import TEST
    from megatron_gr.models.ranking.metrics import auc
    from megatron_gr.models.registry import get_train_spec

    config = resolve_config(str(REPO / "configs/dlrm_hstu_synthetic.yaml"))
    data = get_train_spec("ranking").build_dataset(config).data
    test = np.repeat(data.samples.split == TEST, data.samples.num_candidates)
    task = config.ranking.selection_index
    oracle, labels = data.oracle[test, task], data.labels[test, task]
    rng = np.random.default_rng(0)
    redrawn = [auc(oracle, rng.random(oracle.size) < oracle) for _ in range(draws)]
    return {"bayes_auc": auc(oracle, labels), "mc_mean": float(np.mean(redrawn)), "mc_std": float(np.std(redrawn)),
            "draws": draws, "test_candidates": int(oracle.size)}


def table(results: list[dict], seeds: list[int]) -> str:
    lines = ["| model | " + " | ".join(f"test {m.upper()}" for m in METRICS) + " | runs |", "|---|" + "---|" * (len(METRICS) + 1)]
    for variant in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == variant]
        cells = []
        for metric in METRICS:
            values = [r[metric] for r in rows if metric in r]
            if not values:
                cells.append("-")
            elif len(values) == 1 or rows[0]["seed"] is None:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        runs = "deterministic" if rows[0]["seed"] is None else f"{len(rows)} seeds ({', '.join(map(str, seeds))})"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("synthetic", "ml100k"))
    parser.add_argument("--data-path", help="ML-100K directory (ml100k)")
    parser.add_argument("--out", required=True, help="directory for the runs and results.json")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 1234 (synthetic), 1234 1235 1236 (ml100k)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    args = parser.parse_args()
    if args.dataset == "ml100k" and not args.data_path:
        parser.error("ml100k needs --data-path")
    seeds = args.seeds or ([1234] if args.dataset == "synthetic" else [1234, 1235, 1236])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [item for s in args.sets for item in ("--set", s)]
    if args.data_path:
        extra += ["--data-path", args.data_path]
    jobs = [(variant, seed) for variant in args.variants for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: train(args.dataset, job[0], job[1], out, extra), jobs))
    if args.dataset == "ml100k":
        results.append(popularity(args.data_path))
    summary = {"runs": results}
    if args.dataset == "synthetic" and not args.sets:
        summary["bayes"] = bayes_sampling_error()
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(table(results, seeds))
    if "bayes" in summary:
        bayes = summary["bayes"]
        print(f"Bayes AUC on test {bayes['bayes_auc']:.4f}; over {bayes['draws']} redraws of the labels "
              f"{bayes['mc_mean']:.4f} +- {bayes['mc_std']:.4f} ({bayes['test_candidates']} candidates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
