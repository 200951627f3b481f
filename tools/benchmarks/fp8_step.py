#!/usr/bin/env python3
"""Training steps in bf16 against FP8 linears (per recipe) on a GPU.

Step time (default): each variant builds its trainer, runs ``--warmup`` steps, then
``--steps`` timed steps (device time between CUDA events around each step, median), and
reports tokens per step, model TFLOP/s (``megatron_gr/models/hstu_flops.py``: the step's
useful matmul FLOPs), peak memory and the speedup over bf16. Variants run one after the
other in this process, each on a fresh trainer with the same seed (same batches).

Loss tracking (``--loss-steps N``): each variant trains N steps from the same seed (per
``--seeds``), evaluating at the end; prints the loss averaged over windows of
``--window`` steps, the largest relative gap between each FP8 variant's and bf16's window
means after the first window, and the final validation/test metrics (with several seeds,
the bf16 seed-to-seed spread is the noise to compare with).

Without ``--config`` the model is the 8-layer, hidden-1024 STU model with 4 heads of 256
on synthetic data (sequences of ~400 tokens, up to 1024), micro-batches of 32 users;
any pretrain flag or ``--set`` applies on top, to every variant.

CUDA graphs (``--cuda-graphs none layers``): every variant is timed once per
``training.cuda_graphs`` mode (captured before its timed steps); the rows then also show the
graphs' capture memory and how many layer calls were replayed or ran eagerly (micro-batches
above ``training.cuda_graph_max_tokens``), and the speed-up is against bf16 in the same mode.

    python tools/benchmarks/fp8_step.py [--variants bf16 tensorwise delayed rowwise] [--steps 30]
        [--format hybrid] [--cuda-graphs none layers] [--json out.json] [pretrain flags]
    python tools/benchmarks/fp8_step.py --loss-steps 1000 [--seeds 1234 1235] [--variants bf16 delayed] ...
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys

import torch

BENCHMARK_MODEL = {
    "model.num_layers": 8, "model.hidden_size": 1024, "model.num_attention_heads": 4, "model.qk_head_dim": 256,
    "model.v_head_dim": 256, "model.max_seq_len": 1024, "training.kernel_backend": "triton",
    "model.hidden_dropout": 0.0, "data.synthetic.num_users": 20000, "data.synthetic.num_items": 50000,
    "data.synthetic.mean_length": 400, "data.synthetic.max_length": 2048, "training.micro_batch_size": 32,
}
VARIANTS = ("bf16", "tensorwise", "delayed", "rowwise")


def variant_overrides(name: str, fmt: str) -> list[tuple[list[str], object]]:
    if name == "bf16":
        return []
    values = {"model.fp8": fmt, "model.fp8_recipe": name}
    if name == "delayed":
        values.update({"model.fp8_amax_history_len": 16, "model.fp8_amax_compute_algo": "max"})
    return [(key.split("."), value) for key, value in values.items()]


def build_trainer(args, base, name, extra=()):
    from megatron_gr.config import resolve_config
    from megatron_gr.training.trainer import Trainer

    config = resolve_config(args.config, base + variant_overrides(name, args.format) + list(extra))
    trainer = Trainer(config)
    lengths = []
    next_step = trainer.loader.next_step

    def recording_next_step():
        batches = next_step()
        lengths.append(torch.cat([b.lengths for b in batches]))
        return batches

    trainer.loader.next_step = recording_next_step
    return trainer, lengths


def free_memory() -> None:
    """After the last reference to a trainer is gone: its model and optimizer too."""
    gc.collect()
    torch.cuda.empty_cache()


def graph_statistics(trainer) -> dict:
    """The CUDA graph runner's counters (empty without ``training.cuda_graphs``)."""
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    runner = graph_runner(unwrap(trainer.model[0]))
    return runner.statistics() if runner is not None else {}


def time_variant(args, base, name, graphs=None) -> dict:
    from megatron_gr.models.hstu_flops import training_step_flops

    extra = [] if graphs is None else [(["training", "cuda_graphs"], graphs)]
    trainer, lengths = build_trainer(args, base, name, extra)
    replays_before = graph_statistics(trainer)
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    lengths.clear()
    times, tokens, flops = [], [], []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        record = trainer.train_step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        tokens.append(record["tokens"])
        flops.append(training_step_flops(trainer.model[0].config, lengths[-1]))
    result = {
        "variant": name, "cuda_graphs": trainer.config.training.cuda_graphs,
        "median_step_s": statistics.median(times), "tokens_per_step": statistics.mean(tokens),
        "tflops": statistics.mean(f / t for f, t in zip(flops, times)) / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "step_s": times,
    }
    after = graph_statistics(trainer)
    if after:  # the timed steps' replays and eager layer calls, and the captures' memory
        result["graphs"] = {
            "capture_memory_gib": after["cuda_graphs/capture_memory_gib"],
            "replays": after["cuda_graphs/replays"] - replays_before["cuda_graphs/replays"],
            "eager_calls": after["cuda_graphs/eager_calls"] - replays_before["cuda_graphs/eager_calls"],
        }
    del trainer
    free_memory()
    return result


def loss_variant(args, base, name, seed) -> dict:
    extra = [(["training", "train_iters"], args.loss_steps), (["training", "seed"], seed),
             (["training", "early_stopping_patience"], 0), (["logging", "log_interval"], args.loss_steps)]
    trainer, _ = build_trainer(args, base, name, extra)
    losses = []
    train_step = trainer.train_step

    def recording_train_step():
        record = train_step()
        losses.append(record["loss"])
        return record

    trainer.train_step = recording_train_step
    final = trainer.train()
    del trainer
    free_memory()
    return {"variant": name, "seed": seed, "losses": losses, "final": final}


def window_means(losses: list[float], window: int) -> list[float]:
    return [statistics.mean(losses[i : i + window]) for i in range(0, len(losses) - window + 1, window)]


def print_timing(results: list[dict]) -> None:
    bf16 = {r["cuda_graphs"]: r for r in results if r["variant"] == "bf16"}
    print("| variant | cuda_graphs | step ms (median) | tokens/step | model TFLOP/s | peak memory GiB | "
          "graph memory GiB | replays / eager layer calls | speedup vs bf16 (same graphs) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        base = bf16.get(r["cuda_graphs"])
        speedup = f"{base['median_step_s'] / r['median_step_s']:.2f}" if base else "-"
        graphs = r.get("graphs")
        memory = f"{graphs['capture_memory_gib']:.2f}" if graphs else "-"
        calls = f"{graphs['replays']} / {graphs['eager_calls']}" if graphs else "-"
        print(f"| {r['variant']} | {r['cuda_graphs']} | {r['median_step_s'] * 1e3:.1f} | {r['tokens_per_step']:.0f} | "
              f"{r['tflops']:.0f} | {r['peak_memory_gib']:.2f} | {memory} | {calls} | {speedup} |")


def print_losses(runs: list[dict], window: int) -> None:
    seeds = sorted({r["seed"] for r in runs})
    for seed in seeds:
        by_name = {r["variant"]: window_means(r["losses"], window) for r in runs if r["seed"] == seed}
        names = list(by_name)
        print(f"\nseed {seed}: mean loss per {window} steps")
        print("| steps | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        for i in range(len(next(iter(by_name.values())))):
            print(f"| {i * window + 1}-{(i + 1) * window} | " + " | ".join(f"{by_name[n][i]:.4f}" for n in names) + " |")
        if "bf16" in by_name:
            for name in names:
                if name != "bf16":
                    gaps = [abs(a - b) / b for a, b in zip(by_name[name][1:], by_name["bf16"][1:])]
                    print(f"{name}: largest relative gap to bf16 after the first window: {max(gaps, default=0):.4f}")
    print("\n| variant | seed | best iteration | valid HR@10 | valid NDCG@10 | test HR@10 | test NDCG@10 | test MRR |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        f = r["final"]
        print(f"| {r['variant']} | {r['seed']} | {f['best_iteration']} | {f['valid']['hr@10']:.4f} | "
              f"{f['valid']['ndcg@10']:.4f} | {f['test']['hr@10']:.4f} | {f['test']['ndcg@10']:.4f} | "
              f"{f['test']['mrr']:.4f} |")


def main() -> int:
    from megatron_gr.config import add_config_arguments, overrides_from_args
    from megatron_gr.training.runtime import shutdown

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--format", choices=("hybrid", "e4m3"), default="hybrid", help="FP8 format of the fp8 variants")
    parser.add_argument("--cuda-graphs", nargs="+", choices=("none", "layers", "step"),
                        help="time every variant under each of these training.cuda_graphs modes")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--loss-steps", type=int, default=0, help="train this many steps per variant and compare losses")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234], help="seeds of the loss runs")
    parser.add_argument("--window", type=int, default=100, help="steps per loss window")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU with FP8 tensor cores", file=sys.stderr)
        return 2
    base = [] if args.config else [(key.split("."), value) for key, value in BENCHMARK_MODEL.items()]
    base += overrides_from_args(args) + [(["logging", "progress"], "off")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.loss_steps:
        runs = [loss_variant(args, base, name, seed) for seed in args.seeds for name in args.variants]
        print_losses(runs, args.window)
        summary = {"mode": "loss", "runs": runs}
    else:
        base += [(["training", "eval_interval"], 0)]
        results = [time_variant(args, base, name, graphs) for graphs in (args.cuda_graphs or [None])
                   for name in args.variants]
        print_timing(results)
        summary = {"mode": "step", "results": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "format": args.format, **summary}, handle, indent=2)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
