#!/usr/bin/env python3
"""One training step of a dynamic (hash-table) embedding against a static nn.Embedding.

A step is lookup + backward + Adam on the touched rows for ``--ids`` ids drawn Zipf(``--zipf``)
from ranks ``1..--id-space`` (every step draws afresh; ranks are scrambled by a 64-bit
bijection into raw ids spread over the whole int64 range). Tables hold ``--rows`` rows of
``--dim`` float32 in GPU memory, with Adam's two moments.

- ``dynamic``: :class:`DynamicEmbeddingCollection` (Triton probe, row initialisation and
  reads, segment-sum backward, fused row-sparse Adam), one rank;
- ``static``: ``nn.Embedding(rows, dim, sparse=True)`` looked up at ``raw id mod rows`` (how a
  fixed table serves a large id space), its sparse gradient coalesced, then the same fused
  row-sparse Adam kernel on the coalesced rows;
- ``static_sparse_adam``: the same embedding with ``torch.optim.SparseAdam``.

Each step's time is taken with CUDA events after ``--warmup`` steps; the upstream gradient is
one fixed random tensor. ``--breakdown`` also times the phases of the dynamic step
(``PHASES``, CUDA events between them: a phase also holds any wait for the host to launch
its kernels, mainly after the dedupe's host read) and lists every kernel's GPU time.

    python tools/benchmarks/dynamic_embedding.py --output dynamic_embedding.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig  # noqa: E402
from megatron_gr.config.embedding_config import EmbeddingTableConfig  # noqa: E402
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection  # noqa: E402
from megatron_gr.embeddings.dynamic.exchange import dedupe  # noqa: E402
from megatron_gr.ops import hash_table  # noqa: E402
from megatron_gr.ops.pytorch.id_hash import mix64  # noqa: E402
from megatron_gr.ops.segment_sum import segment_sum  # noqa: E402
from megatron_gr.ops.sparse_optimizers import sparse_update  # noqa: E402


# Phases of the dynamic step (``--breakdown``), in order: routing hash; dedupe (stable sort,
# groups, the step's one host read); find-or-insert; new rows' initial values (their
# optimizer state is flagged fresh, not written); counters; each id's row read from the
# table ([N, D]); backward (per-id gradient sums); Adam on the touched rows.
PHASES = ("hash", "dedupe", "probe", "init_rows", "count", "read", "backward", "adam")
PROFILED = 3  # steps under torch.profiler (--breakdown), for the time of every kernel


def zipf_ids(count: int, exponent: float, id_space: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` raw ids: Zipf ranks in [1, id_space] (exact sampler, out-of-range draws
    redrawn), scrambled by splitmix64 so hot ids are not small integers."""
    ranks = np.empty(0, dtype=np.int64)
    while ranks.size < count:
        draw = rng.zipf(exponent, size=2 * (count - ranks.size) + 1024)
        ranks = np.concatenate([ranks, draw[draw <= id_space][: count - ranks.size]])
    return mix64(torch.from_numpy(ranks))


def kernel_times(step, batches) -> dict[str, float]:
    """GPU time per step of every kernel (microseconds, largest first) over ``batches``,
    from torch.profiler: what each phase is made of."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for ids in batches:
            step(ids)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:100]  # templated library kernels have names of a thousand characters
            totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us() / len(batches)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


class Timer:
    """CUDA-event time of every step after the warm-up."""

    def __init__(self):
        self.ms: list[float] = []

    def time(self, fn, *, record: bool) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if record:
            self.ms.append(start.elapsed_time(end))

    def summary(self, ids_per_step: int) -> dict:
        mean = statistics.fmean(self.ms)
        return {
            "ms_per_step_mean": mean,
            "ms_per_step_median": statistics.median(self.ms),
            "ms_per_step_min": min(self.ms),
            "ids_per_s": ids_per_step / (mean / 1e3),
            "steps_timed": len(self.ms),
        }


def run_dynamic(args, batches, grad, fresh) -> dict:
    """``fresh``: batches not seen before, for the phase breakdown."""
    settings = DynamicTableConfig(
        capacity=args.rows, bucket_size=args.bucket_size, eviction="lru", optimizer="adam", lr=1e-3,
        beta1=0.9, beta2=0.999, eps=1e-8,
    )
    config = EmbeddingTableConfig(dim=args.dim, type="dynamic", init_std=0.02, dynamic=settings)
    collection = DynamicEmbeddingCollection({"t": config}, default_seed=0, device=torch.device("cuda"), backend="triton")
    table = collection.tables["t"]
    timer = Timer()
    phases = {name: [] for name in PHASES}
    uniques = []

    def step(ids):
        out = collection.lookup("t", ids)
        out.backward(grad)
        table.apply_step(dense_lr=0.0)

    def step_with_phases(ids):
        """The same work as ``step`` (one rank, no admission), spelled out to time each
        phase: exchange.table_rows = find (probe, init_rows, counters) + read, its backward =
        segment_sum + accumulate."""
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
        marks[0].record()
        hashes = hash_table.routing_keys(ids, kernel="triton")
        marks[1].record()
        queries = dedupe(hashes, ids, torch.zeros(ids.numel(), dtype=torch.int32, device=ids.device), False, "triton")
        marks[2].record()
        result = table.index.probe(
            queries.ids, queries.tags, queries.hashes, queries.counts, torch.ones_like(queries.ids, dtype=torch.bool),
            step=table.step, update_scores=True,
        )
        marks[3].record()
        hash_table.init_rows(
            table.weights, table._fresh, result.slots, result.status, queries.ids, queries.tags, table.salts, table.scales,
            kernel="triton",
        )
        marks[4].record()
        table._count(result)
        marks[5].record()
        table.read(result.slots, queries.ids, queries.tags, index=queries.groups.inverse)
        marks[6].record()
        table.accumulate(result.slots, segment_sum(grad, queries.groups, kernel="triton"))
        marks[7].record()
        table.apply_step(dense_lr=0.0)
        marks[8].record()
        marks[8].synchronize()
        uniques.append(queries.ids.numel())
        return [marks[i].elapsed_time(marks[i + 1]) for i in range(len(PHASES))]

    for i, ids in enumerate(batches):
        record = i >= args.warmup
        timer.time(lambda: step(ids), record=record)
    result = timer.summary(args.ids)
    if args.breakdown:
        result["kernels_us_per_step"] = kernel_times(step, fresh[-PROFILED:])
        for i, ids in enumerate(fresh[:-PROFILED]):
            times = step_with_phases(ids)
            if i >= 2:  # the first ones still pay for the switch of code path
                for name, ms in zip(phases, times):
                    phases[name].append(ms)
        result["phases_ms"] = {name: statistics.median(values) for name, values in phases.items()}
        result["unique_ids_per_step"] = statistics.fmean(uniques)
    stats = table.statistics()
    steps = len(batches) + len(fresh)
    result.update({
        "capacity": table.capacity,
        "occupancy_at_end": stats["occupancy"],
        "load_factor_at_end": stats["load_factor"],
        "inserts_per_step": stats["inserts"] / steps,
        "evictions_per_step": stats["evictions"] / steps,
        "hit_rate": stats["hits"] / max(stats["lookups"], 1),
        "rejected_full": stats["rejected_full"],
    })
    return result  # the caller empties the CUDA cache once the table is freed


def run_static(args, batches, grad, *, fused: bool) -> dict:
    embedding = torch.nn.Embedding(args.rows, args.dim, sparse=True, device="cuda")
    torch.nn.init.uniform_(embedding.weight, -0.02 * 3**0.5, 0.02 * 3**0.5)
    rows_of = [ids.remainder(args.rows) for ids in batches]
    if fused:
        states = [torch.zeros_like(embedding.weight), torch.zeros_like(embedding.weight)]
    else:
        optimizer = torch.optim.SparseAdam(embedding.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    count = [0]

    def step(rows):
        out = embedding(rows)
        out.backward(grad)
        if fused:
            count[0] += 1
            sparse = embedding.weight.grad.coalesce()
            sparse_update(
                embedding.weight.data, states, sparse.indices()[0], sparse.values(), optimizer="adam", lr=1e-3,
                step=count[0], beta1=0.9, beta2=0.999, eps=1e-8, kernel="triton",
            )
        else:
            optimizer.step()
        embedding.weight.grad = None

    timer = Timer()
    for i, rows in enumerate(rows_of):
        timer.time(lambda: step(rows), record=i >= args.warmup)
    return timer.summary(args.ids)  # the caller empties the CUDA cache once the table is freed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=1_050_000, help="ids per step")
    parser.add_argument("--zipf", type=float, default=1.05)
    parser.add_argument("--id-space", type=int, default=2**40, help="Zipf ranks are drawn from 1..id-space")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rows", type=int, default=10_485_760, help="rows of each table (dynamic: capacity)")
    parser.add_argument("--bucket-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="also time the phases of the dynamic step")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dynamic", "static", "static_sparse_adam"])
    parser.add_argument("--output", type=Path, default=Path("dynamic_embedding.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    batches = [zipf_ids(args.ids, args.zipf, args.id_space, rng).cuda() for _ in range(args.warmup + args.steps)]
    fresh = [zipf_ids(args.ids, args.zipf, args.id_space, rng).cuda() for _ in range(12 + PROFILED if args.breakdown else 0)]
    grad = torch.randn(args.ids, args.dim, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    print(f"generated {len(batches)} batches in {time.perf_counter() - started:.1f}s", flush=True)

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "unique_ids_first_batch": int(batches[0].unique().numel()),
    }
    runners = {
        "dynamic": lambda: run_dynamic(args, batches, grad, fresh),
        "static": lambda: run_static(args, batches, grad, fused=True),
        "static_sparse_adam": lambda: run_static(args, batches, grad, fused=False),
    }
    for name, run in runners.items():
        if name in args.skip:
            continue
        try:
            report[name] = run()
            line = report[name]
            print(f"{name:>20}: {line['ms_per_step_mean']:.3f} ms/step (median {line['ms_per_step_median']:.3f}), "
                  f"{line['ids_per_s'] / 1e6:.1f} M ids/s", flush=True)
        except Exception as error:  # keep the other measurements
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name:>20}: failed: {error}", flush=True)
        torch.cuda.empty_cache()  # the run's tables went with its frame
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
