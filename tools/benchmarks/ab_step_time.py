#!/usr/bin/env python3
"""Step time of two variants of one config, measured in one process with their training
steps alternating (A, B, A, B, ...), so that a busy or throttling machine slows both alike.

    python tools/benchmarks/ab_step_time.py --config configs/hstu_ml100k.yaml \
        --data-path ../shared/data/ml-100k --b-set model.enable_hyper_connections=true \
        [--steps 20] [--json out.json] [any pretrain flag, applied to both]

Prints the median step time of each variant and the median of the per-pair ratios B / A.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from step_timing import device_name, timed_step


def main() -> int:
    from megatron_gr.config import add_config_arguments, overrides_from_args, resolve_config
    from megatron_gr.config.loader import parse_assignment
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--b-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override of variant B (repeatable); A is the config as given")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each variant (after 3 warm-up steps)")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    common = overrides_from_args(args) + [(["logging", "progress"], "off"), (["training", "eval_interval"], 0)]
    variants = {
        "A": resolve_config(args.config, common),
        "B": resolve_config(args.config, common + [parse_assignment(item) for item in args.b_set]),
    }
    trainers = {name: Trainer(config) for name, config in variants.items()}

    for _ in range(3):
        for trainer in trainers.values():
            timed_step(trainer)
    times = {name: [] for name in trainers}
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            times[name].append(timed_step(trainer)[0])
    summary = {
        "device": device_name(trainers["A"]),
        "b_set": args.b_set,
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
        "median_ratio_b_over_a": statistics.median(b / a for a, b in zip(times["A"], times["B"])),
        "step_s": times,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "step_s"}, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
