#!/usr/bin/env python3
"""Trains the same config twice, once per attention kernel, and compares the loss curves.

    python tools/benchmarks/kernel_loss_parity.py --config configs/hstu_ml100k.yaml \
        --data-path ../shared/data/ml-100k --train-iters 300 --out runs/parity

Evaluation is switched off. Dropout stays as configured: both kernels draw the same keyed
dropout masks (``megatron_gr/ops/keyed_dropout.py``); with seed, data order and negatives
the same too, the curves differ only by the kernels' arithmetic.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"loss"' in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args, flags = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for kernel in ("pytorch", "triton"):
        metrics = out / f"{kernel}.jsonl"
        metrics.unlink(missing_ok=True)
        subprocess.run(
            [sys.executable, "-m", "megatron_gr.cli", "pretrain", *flags, "--kernel-backend", kernel,
             "--eval-interval", "0",
             "--log-interval", "1", "--progress", "off", "--metrics-file", str(metrics)],
            check=True, stdout=subprocess.DEVNULL,
        )
        curves[kernel] = losses(metrics)
    reference, triton = curves["pytorch"], curves["triton"]
    relative = [abs(a - b) / abs(a) for a, b in zip(reference, triton)]
    summary = {
        "steps": len(reference),
        "max_relative_difference": max(relative),
        "mean_relative_difference": sum(relative) / len(relative),
        "first_loss": [reference[0], triton[0]],
        "last_loss": [reference[-1], triton[-1]],
        "mean_last_20": [sum(reference[-20:]) / 20, sum(triton[-20:]) / 20],
    }
    (out / "parity.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=1))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
