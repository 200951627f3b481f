#!/usr/bin/env python3
"""Step time, tokens/s and peak memory of DLRM-HSTU training on one device, at long
histories: every user has exactly ``--history`` history events and ``--candidates``
candidates (synthetic ranking data), bf16 on a GPU with the Triton kernels.

    python tools/benchmarks/ranking_step.py                      # H100: 4k history, 64 candidates
    python tools/benchmarks/ranking_step.py --users-per-batch 4 --layers 3 --json out.json
    python tools/benchmarks/ranking_step.py --device cpu --backend pytorch --history 32 \
        --candidates 4 --hidden 32 --heads 2 --head-dim 16 --users-per-batch 2 --steps 2   # smoke test
    python tools/benchmarks/ranking_step.py --fp8 delayed        # H100: STU linears and tower in FP8

``--fp8 RECIPE`` (delayed, tensorwise, rowwise; ``--fp8-format`` hybrid or e4m3) runs the
STU linears and the tower's fusion layers in FP8 (docs/guide/fp8.md); ``delayed`` keeps an
amax history of 16 micro-batches and scales from its maximum. Where FP8 cannot run (the
CPU, an older GPU) the benchmark stops with the run's one-line reason.

Prints one markdown row (device | layers x hidden | users x (history + candidates) | step
ms | tokens/s | peak GiB) and, with ``--json``, the details.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from step_timing import device_name, is_cuda, long_history_ranking_config, peak_memory_gib, time_steps

HEADER = ("| device | precision, backend | layers x hidden (heads x dim), relative bias | tokens per step: users x (contextual + history "
          "+ candidates) | step ms (median) | tokens/s | candidates/s | peak memory GiB |")


def benchmark_config(args) -> dict:
    return long_history_ranking_config(args, model={"num_position_buckets": 256,
                                                    "relative_attention_bias": args.relative_bias,
                                                    **fp8_fields(args)})


def fp8_fields(args) -> dict:
    """The model's FP8 settings for ``--fp8 RECIPE`` (none without it)."""
    if args.fp8 is None:
        return {}
    fields = {"fp8": args.fp8_format, "fp8_recipe": args.fp8}
    if args.fp8 == "delayed":
        fields.update(fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    return fields


def precision_label(args, bf16: bool) -> str:
    label = "bf16" if bf16 else "fp32"
    return label if args.fp8 is None else f"{label} + fp8 {args.fp8} ({args.fp8_format})"


def main() -> int:
    from megatron_gr.config import ConfigError, ExperimentConfig
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=4096, help="history events per user")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per user")
    parser.add_argument("--users-per-batch", type=int, default=8, help="users (sequences) per training step")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--relative-bias", action=argparse.BooleanOptionalAction, default=True,
                        help="the relative position + time attention bias (computed inside the attention kernel)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backend", default="triton", choices=("auto", "pytorch", "triton"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--fp8", choices=("delayed", "tensorwise", "rowwise"),
                        help="FP8 linears (STU layers and the tower's fusion layers) with this recipe")
    parser.add_argument("--fp8-format", default="hybrid", choices=("hybrid", "e4m3"),
                        help="with --fp8: e5m2 gradients (hybrid) or e4m3 everywhere")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--json", help="write the details here")
    args = parser.parse_args()

    try:
        trainer = Trainer(ExperimentConfig.from_dict(benchmark_config(args)))
    except ConfigError as error:
        print(f"ranking_step: {error}", file=sys.stderr)
        return 2
    cuda = is_cuda(trainer)
    times, tokens = time_steps(trainer, warmup=3, steps=args.steps)
    median = statistics.median(times)
    per_step = statistics.mean(tokens)
    candidates = args.users_per_batch * args.candidates
    summary = {
        "device": device_name(trainer),
        "precision": precision_label(args, trainer.runtime.bf16),
        "backend": str(trainer.plan.backend),
        "layers": args.layers, "hidden": args.hidden, "heads": args.heads, "head_dim": args.head_dim,
        "relative_bias": args.relative_bias,
        "users_per_step": args.users_per_batch, "history": args.history, "candidates": args.candidates,
        "tokens_per_step": per_step,
        "median_step_s": median,
        "tokens_per_s": per_step / median,
        "candidates_per_s": candidates / median,
        "peak_memory_gib": peak_memory_gib(trainer),
        "step_s": times,
    }
    peak = f"{summary['peak_memory_gib']:.1f}" if cuda else "n/a"
    print(HEADER)
    print("|" + "---|" * 8)
    bias = "bias" if args.relative_bias else "no bias"
    shape = f"{args.layers} x {args.hidden} ({args.heads} x {args.head_dim}), {bias}"
    tokens = f"{args.users_per_batch} x (2 + {args.history} + {args.candidates}) = {per_step:,.0f}"
    print(f"| {summary['device']} | {summary['precision']}, {summary['backend']} | {shape} | {tokens} | "
          f"{median * 1e3:.1f} | {summary['tokens_per_s']:,.0f} | {summary['candidates_per_s']:,.0f} | {peak} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
