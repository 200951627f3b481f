#!/usr/bin/env python3
"""DLRM-HSTU against ULTRA-HSTU on one device, in one command:

1. Speed at long histories (every user exactly ``--history`` events and ``--candidates``
   candidates, synthetic ranking data, bf16 + Triton on a GPU): DLRM-HSTU (one full
   causal STU stack) against ULTRA-HSTU (semi-local attention, attention truncation, a
   second channel over the clicked events, U/V/Q/K and norm rematerialization): median
   step time, tokens/s (every channel's tokens), requests/s, peak memory, the speedup.
2. Quality: ``configs/dlrm_hstu_synthetic.yaml`` against ``configs/ultra_hstu_synthetic.yaml``
   trained for the same ``--quality-steps`` steps through ``megatron-gr pretrain``: test
   AUC (click) and the Bayes AUC of the planted model.

Each measurement runs in its own process; logs and JSON go to ``--out``::

    python tools/benchmarks/ultra_hstu.py --out $OUT              # H100: 8k histories, ~4 minutes
    python tools/benchmarks/ultra_hstu.py --device cpu --backend pytorch --history 24 --candidates 4 \
        --hidden 16 --heads 2 --head-dim 8 --users-per-batch 2 --steps 2 --quality-steps 2 \
        --quality-users 60 --out /tmp/ultra   # smoke test

Prints a markdown table of both parts; ``summary.json`` holds every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_timing import device_name, long_history_ranking_config, peak_memory_gib, time_steps

REPO = Path(__file__).resolve().parents[2]
MODELS = ("dlrm_hstu", "ultra_hstu")


def speed_config(args, model: str) -> dict:
    if model != "ultra_hstu":
        return long_history_ranking_config(args, model={"relative_attention_bias": False}, features={})
    tail = max(1, args.history // 8)
    ultra = {"relative_attention_bias": False, "recompute_uvqk": True, "recompute_normed_x": True, "transducers": [
        {"name": "imp", "sla_k1": max(1, args.history // 8), "sla_k2": max(1, args.history // 64),
         "attn_truncation_split_layer": 1, "attn_truncation_tail_len": tail},
        {"name": "click", "num_layers": max(1, args.layers - 1), "hidden_size": args.hidden // 2,
         "num_attention_heads": max(1, args.heads // 2), "sla_k1": max(1, args.history // 16),
         "sla_k2": max(1, args.history // 64)},
    ]}
    features = {
        "imp": {"item_id": "item", "item_topic": "topic"}, "imp_action": "action", "imp_watchtime": "watch_time",
        "imp_timestamp": "timestamp",
        "click": {"click_item_id": "item", "click_item_topic": "topic"}, "click_action": "click_action",
        "click_watchtime": "click_watch_time", "click_timestamp": "click_timestamp",
    }
    return long_history_ranking_config(args, model=ultra, features=features)


def measure_speed(args, model: str) -> dict:
    """Runs in its own process: timed training steps of ``model``."""
    from megatron_gr.config import ExperimentConfig
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    trainer = Trainer(ExperimentConfig.from_dict(speed_config(args, model)))
    times, tokens = time_steps(trainer, warmup=args.warmup_steps, steps=args.steps)
    median = statistics.median(times)
    result = {
        "model": model, "device": device_name(trainer),
        "precision": "bf16" if trainer.runtime.bf16 else "fp32", "backend": str(trainer.plan.backend),
        "history": args.history, "candidates": args.candidates, "users_per_step": args.users_per_batch,
        "tokens_per_step": statistics.mean(tokens), "median_step_s": median,
        "tokens_per_s": statistics.mean(tokens) / median, "requests_per_s": args.users_per_batch / median,
        "peak_memory_gib": peak_memory_gib(trainer), "step_s": times,
    }
    shutdown()
    return result


def measure_quality(args, model: str, out: Path) -> dict:
    """``megatron-gr pretrain`` of the model's synthetic config for ``--quality-steps``."""
    metrics = out / f"quality_{model}.jsonl"
    metrics.unlink(missing_ok=True)
    command = [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--config", f"configs/{model}_synthetic.yaml",
               "--train-iters", str(args.quality_steps), "--lr-warmup-iters", str(min(20, args.quality_steps - 1)),
               "--eval-interval", "0", "--metrics-file", str(metrics), "--kernel-backend", args.backend,
               "--set", f"data.ranking.synthetic.num_users={args.quality_users}", "--set", "logging.progress=off"]
    if args.device != "auto":
        command += ["--device", args.device]
    log = out / f"quality_{model}.log"
    start = time.perf_counter()
    run(command, log)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    test = [r for r in records if r.get("split") == "test"][-1]
    return {"model": model, "steps": args.quality_steps, "test_auc": test["auc"], "test_gauc": test["gauc"],
            "bayes_auc": test.get("bayes_auc"), "wall_s": time.perf_counter() - start}


def run(command: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(command[:6])} ... failed (exit {result.returncode}); log {log}:\n{tail}")


def table(speed: dict, quality: dict) -> str:
    """The markdown of the parts measured (``speed`` or ``quality`` may be empty)."""
    lines = _speed_rows(speed) if speed else []
    if quality:
        lines += ["", "| model | steps | test AUC (click) | test GAUC | Bayes AUC |", "|---|---|---|---|---|"]
        for name, key in (("DLRM-HSTU", "dlrm_hstu"), ("ULTRA-HSTU", "ultra_hstu")):
            q = quality[key]
            bayes = f"{q['bayes_auc']:.4f}" if q["bayes_auc"] is not None else "n/a"
            lines.append(f"| {name} | {q['steps']} | {q['test_auc']:.4f} | {q['test_gauc']:.4f} | {bayes} |")
    return "\n".join(lines).strip("\n")


def _speed_rows(speed: dict) -> list[str]:
    dlrm, ultra = speed["dlrm_hstu"], speed["ultra_hstu"]
    memory = lambda r: f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"  # noqa: E731
    lines = [
        f"Speed: {dlrm['device']}, {dlrm['precision']}, {dlrm['backend']}; {dlrm['users_per_step']} users x "
        f"({dlrm['history']} history + {dlrm['candidates']} candidates) per step",
        "",
        "| model | tokens per step | step ms (median) | tokens/s | requests/s | peak memory GiB | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("DLRM-HSTU", dlrm), ("ULTRA-HSTU", ultra)):
        speedup = dlrm["median_step_s"] / r["median_step_s"]
        lines.append(f"| {name} | {r['tokens_per_step']:,.0f} | {r['median_step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['requests_per_s']:,.1f} | {memory(r)} | {speedup:.2f}x |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=8192, help="history events per user (speed part)")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per user (speed part)")
    parser.add_argument("--users-per-batch", type=int, default=4, help="users per training step (speed part)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backend", default="triton", choices=("auto", "pytorch", "triton"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--quality-steps", type=int, default=300, help="training steps of each quality run")
    parser.add_argument("--quality-users", type=int, default=3000, help="users of the synthetic quality data")
    parser.add_argument("--parts", default="speed,quality",
                        help="comma-separated: speed (the GPU part), quality (trains on any device)")
    parser.add_argument("--out", default="runs/ultra_hstu", help="directory for logs and JSON")
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)  # internal: one speed measurement
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        (out / f"speed_{args.one}.json").write_text(json.dumps(measure_speed(args, args.one), indent=2))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    speed, quality = {}, {}
    if "speed" in args.parts:
        for model in MODELS:
            run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--one", model], out / f"speed_{model}.log")
            speed[model] = json.loads((out / f"speed_{model}.json").read_text())
    if "quality" in args.parts:
        quality = {model: measure_quality(args, model, out) for model in MODELS}
    summary = {"speed": speed, "quality": quality}
    if speed:
        summary["speedup"] = speed["dlrm_hstu"]["median_step_s"] / speed["ultra_hstu"]["median_step_s"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = table(speed, quality)
    (out / "summary.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
