#!/usr/bin/env python3
"""Build time and memory of each pipeline stage's model: what keyed initialization saves.

    python tools/benchmarks/stage_build.py --pp 4            # launches 4 gloo ranks on the CPU

Each rank builds only its stage (megatron_gr keys every parameter's initial values by the
run seed and its global name, so no stage replays the layers of earlier stages). Prints one
markdown row per stage: layers constructed, CPU time (robust to a shared machine's load) and
wall time, peak resident memory added by the
build, and the parameters the stage keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _model_config(args) -> dict:
    return {
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
                  "qk_head_dim": args.hidden // args.heads, "v_head_dim": args.hidden // args.heads,
                  "max_seq_len": 256},
        "data": {"synthetic": {"num_users": 64, "num_items": args.items}},
        "training": {"device": "cpu", "micro_batch_size": 4},
        "parallel": {"pipeline_model_parallel_size": args.pp},
        "logging": {"progress": "off"},
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from megatron_gr.config import ExperimentConfig
    from megatron_gr.transformer.stu_layer import STULayer
    from tools.benchmarks.stage_build_api import build_stage

    built = []
    original = STULayer.__init__

    def counting_init(self, *a, **k):
        original(self, *a, **k)
        built.append(self.layer_number)

    STULayer.__init__ = counting_init
    config = ExperimentConfig.from_dict(_model_config(args))
    before_rss = _rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = build_stage(config)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    row = {"rank": dist.get_rank(), "layers_built": len(built), "build_s": elapsed, "build_cpu_s": cpu,
           "peak_added_mib": _peak_mib() - before_rss, "params_kept": params}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--out", default="stage_build.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.pp}",
               __file__, "--worker", *sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(command, env=env, check=True)
    rows = json.loads(Path(args.out).read_text())
    print(f"model: {args.layers} STU layers, hidden {args.hidden}, {args.heads} heads, {args.items} items, PP={args.pp}")
    print("| stage | STU layers constructed | build CPU time (s) | build wall time (s) | peak memory added (MiB) | parameters kept |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['rank']} | {row['layers_built']} | {row['build_cpu_s']:.2f} | {row['build_s']:.2f} | {row['peak_added_mib']:.0f} | {row['params_kept']:,} |")


if __name__ == "__main__":
    main()
