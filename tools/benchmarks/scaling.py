#!/usr/bin/env python3
"""Data- and tensor-parallel scaling on the GPUs of one host: training tokens/s per GPU of
one GPU, of DP=N and of TP=N (with and without sequence parallelism), and the scaling
efficiency of each against one GPU.

    python tools/benchmarks/scaling.py --gpus 2 --out $OUT                   # synthetic, --size medium
    python tools/benchmarks/scaling.py --gpus 2 --out $OUT --size none \\
        --config configs/hstu_ml100k.yaml --data-path ../shared/data/ml-100k  # any config and flags
    python tools/benchmarks/scaling.py --gpus 2 --device cpu --size tiny --out /tmp/s  # logic check (gloo)

Runs (each a torchrun of this script, timed after warm-up steps):
  single         one GPU, micro-batch B
  dp             DP=N, micro-batch B on every GPU (weak scaling; micro-batches balanced by
                 attention cost, overlapped gradient reduce-scatter, distributed optimizer)
  dp_unbalanced  the same with micro-batches cut from the shuffled stream (--runs to add it)
  tp, tp_sp      TP=N on the one-GPU batch (strong scaling), without / with sequence parallelism

Efficiency = (tokens/s per GPU of the run) / (tokens/s of one GPU). Writes scaling.json and
scaling.md (a table for docs/benchmarks/) into --out.
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

REPO = Path(__file__).resolve().parents[2]

# Model and data of each size; flags of `megatron-gr pretrain` (--set for the rest).
SIZES = {
    "tiny": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--max-seq-len", "64",
             "--micro-batch-size", "8", "--set", "model.qk_head_dim=16", "--set", "model.v_head_dim=16",
             "--set", "data.synthetic.num_users=400", "--set", "data.synthetic.num_items=500",
             "--set", "data.synthetic.mean_length=30", "--set", "data.synthetic.max_length=128"],
    "medium": ["--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8", "--max-seq-len", "512",
               "--micro-batch-size", "32", "--set", "model.qk_head_dim=64", "--set", "model.v_head_dim=64",
               "--set", "data.synthetic.num_users=20000", "--set", "data.synthetic.num_items=50000",
               "--set", "data.synthetic.mean_length=200", "--set", "data.synthetic.max_length=1024",
               "--set", "parallel.ddp_bucket_size=4000000"],
    "large": ["--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "8", "--max-seq-len", "1024",
              "--micro-batch-size", "16", "--set", "model.qk_head_dim=128", "--set", "model.v_head_dim=128",
              "--set", "data.synthetic.num_users=20000", "--set", "data.synthetic.num_items=50000",
              "--set", "data.synthetic.mean_length=400", "--set", "data.synthetic.max_length=2048",
              "--set", "parallel.ddp_bucket_size=8000000"],
    "none": [],
}
COMMON = ["--set", "model.hidden_dropout=0.0", "--set", "model.embedding_dropout=0.0", "--progress", "off",
          "--eval-interval", "0", "--train-iters", "1000000", "--lr-warmup-iters", "0"]


def runs(gpus: int) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, extra flags)."""
    n = str(gpus)
    return {
        "single": (1, []),
        "dp": (gpus, []),
        "dp_unbalanced": (gpus, ["--set", "parallel.micro_batch_balance=none"]),
        "tp": (gpus, ["--tensor-model-parallel-size", n]),
        "tp_sp": (gpus, ["--tensor-model-parallel-size", n, "--sequence-parallel"]),
    }


# ---------------------------------------------------------------- one run (under torchrun)
def worker(args: argparse.Namespace, flags: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gr.config import add_config_arguments, overrides_from_args, resolve_config
    from megatron_gr.models.hstu_flops import training_step_flops
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parsed = parser.parse_args(flags)
    config = resolve_config(parsed.config, overrides_from_args(parsed))
    trainer = Trainer(config)
    cuda = trainer.runtime.device.type == "cuda"

    def synchronize():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    tokens, step_times, positions = 0, [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        positions.append(trainer.loader.consumed_samples)
        step_start = time.perf_counter()
        record = trainer.train_step()
        step_times.append(time.perf_counter() - step_start)
        tokens += record["tokens"]
    synchronize()
    elapsed = time.perf_counter() - start
    flops = sum(_step_flops(trainer, position, training_step_flops) for position in positions)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=trainer.runtime.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        result = {
            "gpus": world,
            "layout": {
                "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                "data_parallel": parallel_state.get_data_parallel_world_size(),
                "sequence_parallel": config.parallel.sequence_parallel,
                "micro_batch_balance": config.parallel.balance_for(parallel_state.get_data_parallel_world_size()),
            },
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "precision": "bf16" if trainer.runtime.bf16 else "fp32",
            "steps": args.steps,
            "tokens_per_step": tokens / args.steps,
            "median_step_s": statistics.median(step_times),
            "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_gpu": tokens / elapsed / world,
            "useful_tflops_per_s_per_gpu": flops / elapsed / world / 1e12,
            "peak_memory_gib": float(peak) if cuda else None,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutdown()


def _step_flops(trainer, consumed: int, training_step_flops) -> int:
    """FLOPs of the global batch a step took from stream position ``consumed`` (every
    rank's micro-batches), counted after the timing."""
    import torch

    from megatron_gr.data.loader import TrainingBatches

    loader = trainer.loader
    every_rank = TrainingBatches(
        loader.split, loader.items, max_seq_len=trainer.config.model.max_seq_len, micro_batch_size=loader.micro_batch_size,
        num_micro_batches=loader.num_micro_batches * loader.dp_size, seed=loader.seed, partition_fn=loader.partition_fn,
    )
    every_rank.load_state_dict({"consumed_samples": consumed})
    lengths = [b.lengths for b in every_rank.next_step()]
    return training_step_flops(trainer.model[0].config, torch.cat(lengths))


# ------------------------------------------------------------------------------- driver
def drive(args: argparse.Namespace, flags: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = runs(args.gpus)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in plan]
    if unknown or names[0] != "single":
        raise SystemExit(f"--runs must start with single and name runs among {', '.join(plan)} (got {args.runs})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for name in names:
        processes, extra = plan[name]
        run_flags = [*SIZES[args.size], *COMMON, "--device", args.device, *flags, *extra]
        target = out / f"{name}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   __file__, "--worker", "--json", str(target), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--", *run_flags]
        print("+", " ".join(command), flush=True)
        log = out / f"{name}.log"
        with log.open("w") as handle:
            code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            print(f"{name} failed (exit {code}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
            return code
        results[name] = json.loads(target.read_text())
        print(f"  {name}: {results[name]['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU", flush=True)
    base = results["single"]["tokens_per_s_per_gpu"]
    for result in results.values():
        result["efficiency"] = result["tokens_per_s_per_gpu"] / base
    summary = {"size": args.size, "flags": flags, "runs": results}
    (out / "scaling.json").write_text(json.dumps(summary, indent=2))
    (out / "scaling.md").write_text(markdown(summary, " ".join(sys.argv)))
    print((out / "scaling.md").read_text())
    return 0


def markdown(summary: dict, command: str) -> str:
    first = next(iter(summary["runs"].values()))
    lines = [
        f"Device: {first['device']} ({first['precision']}); size preset `{summary['size']}`"
        + (f", flags `{' '.join(summary['flags'])}`" if summary["flags"] else "") + ".",
        f"Command: `{command}`",
        "",
        "| run | GPUs | TP | DP | SP | micro-batches | tokens/step | step (ms, median) | tokens/s per GPU | useful TFLOP/s per GPU | peak GiB | efficiency |",
        "| --- | ---: | ---: | ---: | :---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in summary["runs"].items():
        layout = r["layout"]
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(
            f"| {name} | {r['gpus']} | {layout['tensor_parallel']} | {layout['data_parallel']} | "
            f"{'yes' if layout['sequence_parallel'] else 'no'} | {layout['micro_batch_balance']} | "
            f"{r['tokens_per_step']:,.0f} | {1000 * r['median_step_s']:.1f} | {r['tokens_per_s_per_gpu']:,.0f} | "
            f"{r['useful_tflops_per_s_per_gpu']:.1f} | {peak} | {100 * r['efficiency']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the parallel runs")
    parser.add_argument("--out", help="directory for scaling.json, scaling.md and one log per run")
    parser.add_argument("--size", choices=list(SIZES), default="medium", help="model and synthetic-data preset (none: only your flags)")
    parser.add_argument("--runs", default="single,dp,tp,tp_sp", help="comma-separated, starting with single")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args, flags = parser.parse_known_args(argv[:split])
    flags += argv[split + 1 :]
    if args.worker:
        worker(args, flags)
        return 0
    if not args.out:
        parser.error("--out is required")
    return drive(args, flags)


if __name__ == "__main__":
    sys.exit(main())
