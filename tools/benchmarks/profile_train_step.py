#!/usr/bin/env python3
"""Times and profiles training steps of any config; prints tokens/s, TFLOP/s (useful
FLOPs of every timed step, counted from its own micro-batches: megatron_gr/models/hstu_flops.py),
peak memory and the top operators. MFU, the phase breakdown and before/after rows:
``tools/benchmarks/e2e_step.py``.

    python tools/benchmarks/profile_train_step.py --config configs/hstu_ml100k.yaml \
        --data-path ../shared/data/ml-100k [--steps 20] [--profile-steps 3] [any pretrain flag]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from step_timing import record_step_batches  # the sibling helper (this directory is on sys.path when run)


def main() -> int:
    from megatron_gr.config import add_config_arguments, overrides_from_args, resolve_config
    from megatron_gr.models.hstu_flops import step_flops
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--profile-steps", type=int, default=0, help="extra steps under torch.profiler")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    overrides = overrides_from_args(args) + [(["logging", "progress"], "off"), (["training", "eval_interval"], 0)]
    config = resolve_config(args.config, overrides)
    trainer = Trainer(config)
    cuda = trainer.runtime.device.type == "cuda"

    taken = record_step_batches(trainer)

    def step():
        record = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        return record

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    taken.clear()
    times, tokens = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        record = step()
        times.append(time.perf_counter() - start)
        tokens.append(record["tokens"])
    config = trainer.model[0].config
    flops = [step_flops(config, [b.lengths.cpu() for b in batches]).total for batches in taken]
    median = statistics.median(times)
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16" if trainer.runtime.bf16 else "fp32",
        "median_step_s": median,
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": statistics.mean(tokens) / median,
        "useful_tflops_per_s": sum(flops) / sum(times) / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
