#!/usr/bin/env python3
"""End-to-end training-step speed: tokens/s, TFLOP/s and MFU of every timed step counted
from that step's own micro-batches, peak memory, and where the GPU time goes.

    # the standard shape of docs/benchmarks/e2e.md (8 layers, hidden 1024, 4 x 256 heads,
    # max length 4096, Zipf(1.2) lengths, 32 users per micro-batch), three variants
    python tools/benchmarks/e2e_step.py --standard --json $OUT/e2e.json --markdown $OUT/e2e.md
    # any config and flags, variants as overrides
    python tools/benchmarks/e2e_step.py --config configs/hstu_ml100k.yaml --data-path DIR \
        --variant eager --variant graphs:training.cuda_graphs=layers --loss-parity eager,graphs

Per variant: ``--warmup`` steps, then ``--steps`` steps timed back to back (one window
between two device synchronisations: the throughput a run sees), then ``--profile-steps``
under torch.profiler for the phase breakdown (``step_phases.py``; host gaps = the timed
step time minus the GPU's busy time per profiled step). MFU is against the GPU's dense bf16
peak (``--peak-tflops``, else from the device name) and against a bf16 matrix product
timed in the same run (``--matmul-size``).

``--tree DIR`` also runs every variant with the ``megatron_gr`` package found in DIR (e.g.
an export of an older commit: ``git archive <commit> megatron_gr | tar -x -C DIR``): the
"before" rows (for speed: main's numerics changed since, see ``reference_step.py``).
Variants whose keys that tree does not know are reported as skipped. ``--reference`` runs
every variant (``--reference-variants``: these) again with this tree's step speed-ups
turned off (``reference_step.py``): the "reference" rows, the like-with-like baseline, in
speed and in loss (``--loss-parity reference/plain,after/plain``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), by device name.
PEAK_TFLOPS = (("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4), ("H200", 989.4))
STANDARD_DATA = dict(num_users=4096, num_items=50_000, length_distribution="zipf", length_zipf_exponent=1.2,
                     min_length=5, max_length=4096 + 3, seed=0)
"""Zipf(1.2) histories; 4096 + 3 events fill a 4096-token window (leave-one-out holds two
events out, and a window's last event is only a label)."""
STANDARD_FLAGS = [
    (["model", "num_layers"], 8), (["model", "hidden_size"], 1024), (["model", "num_attention_heads"], 4),
    (["model", "qk_head_dim"], 256), (["model", "v_head_dim"], 256), (["model", "max_seq_len"], 4096),
    (["training", "micro_batch_size"], 32),
]
DYNAMIC = "embeddings.item.type=dynamic,embeddings.item.dynamic.capacity=65536"
STANDARD_VARIANTS = [
    "plain:model.relative_attention_bias=false",
    "plain_bias:model.relative_attention_bias=true",
    f"dynamic:model.relative_attention_bias=false,{DYNAMIC}",
]
"""The standard rows; the dynamic table with the bias too: ``--variant dynamic_bias:model.relative_attention_bias=true,<DYNAMIC>``."""


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def parse_variant(text: str) -> dict:
    """``name`` or ``name:section.key=value,section.key=value``."""
    from megatron_gr.config.loader import parse_assignment

    name, _, sets = text.partition(":")
    return {"name": name, "overrides": [parse_assignment(item) for item in sets.split(",") if item]}


def write_standard_data(directory: Path) -> Path:
    from megatron_gr.data import SyntheticSpec, UserSequences, generate
    from megatron_gr.data.prepared import is_prepared, save_prepared

    if not is_prepared(directory):
        sequences = UserSequences.from_events(generate(SyntheticSpec(**STANDARD_DATA)))
        save_prepared(sequences, directory, source="synthetic zipf(1.2)", created_by="tools/benchmarks/e2e_step.py")
    return directory


def _worker(tree: Path, spec: dict, work: Path, label: str) -> tuple[list[str], dict, Path]:
    spec_path, result_path = work / f"spec_{label}.json", work / f"result_{label}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    worker = REPO_ROOT / "tools" / "benchmarks" / "e2e_worker.py"
    return [sys.executable, str(worker), str(spec_path), str(result_path)], env, result_path


def _trees(args) -> list[tuple[str, Path, dict, list[str] | None]]:
    """(label, package directory, spec additions, variant subset) of every tree that runs."""
    trees = [("after", REPO_ROOT, {}, None)]
    if args.reference:
        picked = args.reference_variants.split(",") if args.reference_variants else None
        trees.append(("reference", REPO_ROOT, {"reference_step": True}, picked))
    if args.tree:
        picked = args.tree_variants.split(",") if args.tree_variants else None
        trees.append(("before", Path(args.tree).resolve(), {}, picked))
    return trees


def run_tree(tree: Path, spec: dict, work: Path, label: str, names: list[str]) -> dict:
    """Runs the variants ``names`` with the package of ``tree``, each in a process of its own:
    a variant's CUDA-graph pools and caches end with it (four graphed variants in one process
    ran an 80 GB GPU out of memory). The matrix-product ceiling is timed in the first."""
    result = {"matmul_ceiling_tflops": None, "variants": {}}
    for index, name in enumerate(names):
        part = {**spec, "only": [name], "matmul_size": spec["matmul_size"] if index == 0 else 0}
        command, env, result_path = _worker(tree, part, work, f"{label}_{name}")
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            result["variants"][name] = {"error": f"worker exited with {done.returncode}"}
            continue
        measured = json.loads(result_path.read_text())
        result["variants"].update(measured["variants"])
        if index == 0:
            result["matmul_ceiling_tflops"] = measured["matmul_ceiling_tflops"]
    return result


def warm_caches(runs: list[tuple[str, Path, str]], spec: dict, work: Path) -> int:
    """Runs a few steps of every (tree label, tree, variant) at once, one process each, and
    waits: Triton compiles a kernel in the process that first launches it, single-threaded,
    and keeps it in its on-disk cache, so the measured runs that follow start compiled."""
    quick = {**spec, "warmup": 2, "steps": 1, "profile_steps": 0, "matmul_size": 0}
    processes = []
    for label, tree, extra, name in runs:
        command, env, _ = _worker(tree, {**quick, **extra, "only": [name]}, work, f"warm_{label}_{name}")
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    return max((p.wait() for p in processes), default=0)


def summarize(run: dict, flops_per_step: list, *, peak: float | None, ceiling: float | None) -> dict:
    from step_phases import phase_breakdown

    steps = run["steps"]
    step_s = run["window_s"] / steps
    flops = sum(flops_per_step)
    tflops = flops / run["window_s"] / 1e12
    row = {
        "device": run["device"],
        "tokens_per_step": statistics.mean(run["tokens"]),
        "step_ms": step_s * 1e3,
        "tokens_per_s": sum(run["tokens"]) / run["window_s"],
        "tflops_per_s": tflops,
        "mfu_peak": tflops / peak if peak else None,
        "mfu_matmul_ceiling": tflops / ceiling if ceiling else None,
        "peak_memory_gib": run["peak_memory_gib"],
        "flops_per_step": flops_per_step,
        "host_step_ms_median": statistics.median(run["host_step_s"]) * 1e3,
        "host_step_ms": [s * 1e3 for s in run["host_step_s"]],
        **({"device_step_ms": run["device_step_ms"]} if run.get("device_step_ms") else {}),
        "losses": run["losses"],
        **({"cuda_graphs": run["cuda_graphs"]} if "cuda_graphs" in run else {}),
    }
    if run.get("trace"):
        trace = json.loads(Path(run["trace"]).read_text())
        phases = phase_breakdown(trace, num_steps=run["profiled_steps"])
        row.update(phases)
        row["host_gaps_ms"] = max(row["step_ms"] - phases["gpu_busy_ms"], 0.0)
    return row


def loss_parity(rows: dict, first: str, second: str) -> dict:
    """Relative differences of two runs' losses, step by step. A run is ``variant`` (this
    tree) or ``tree/variant`` (``before/plain``); a run that did not happen is reported so."""
    keys = [tuple(name.split("/", 1)) if "/" in name else ("after", name) for name in (first, second)]
    runs = [rows.get(key, {}) for key in keys]
    if not all("losses" in run for run in runs):
        return {"runs": [first, second], "missing": [n for n, r in zip((first, second), runs) if "losses" not in r]}
    diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(runs[0]["losses"], runs[1]["losses"])]
    return {"runs": [first, second], "steps": len(diffs), "max_rel_diff": max(diffs), "mean_rel_diff": statistics.mean(diffs)}


def markdown(rows: dict) -> str:
    head = ("| tree | variant | tokens/step | step ms | tokens/s | TFLOP/s | MFU peak | MFU ceiling | peak GiB | "
            "attn fwd | attn bwd | GEMM | norms+elem | emb | loss | optim | copies | host gaps |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (tree, name), row in rows.items():
        if "skipped" in row or "error" in row:
            lines.append(f"| {tree} | {name} | {row.get('skipped') or row.get('error')} |")
            continue
        ms = row.get("phases_ms", {})
        phase_cells = " | ".join(f"{ms[p]:.2f}" if p in ms else "n/a" for p in (
            "attention_forward", "attention_backward", "gemm", "norms_and_elementwise", "embeddings", "loss",
            "optimizer", "copies"))
        gib = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "n/a"
        gaps = f"{row['host_gaps_ms']:.2f}" if "host_gaps_ms" in row else "n/a"
        lines.append(
            f"| {tree} | {name} | {row['tokens_per_step']:.0f} | {row['step_ms']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['tflops_per_s']:.1f} | {_percent(row['mfu_peak'])} | {_percent(row['mfu_matmul_ceiling'])} | {gib} | "
            f"{phase_cells} | {gaps} |"
        )
    return "\n".join(lines) + "\n"


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a"


def main() -> int:
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from megatron_gr.config import add_config_arguments, overrides_from_args, resolve_config
    from megatron_gr.models.hstu_flops import step_flops
    from megatron_gr.training.plan import make_plan

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--standard", action="store_true", help="the standard shape and its variants (STANDARD_VARIANTS)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    parser.add_argument("--tree", help="also run with the megatron_gr package of this directory (rows 'before')")
    parser.add_argument("--tree-variants", help="with --tree: only these variants (comma separated)")
    parser.add_argument("--reference", action="store_true",
                        help="also run this tree with its step speed-ups off (rows 'reference', reference_step.py)")
    parser.add_argument("--reference-variants", help="with --reference: only these variants (comma separated)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from its name)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="size of the timed bf16 matrix product (0: skip)")
    parser.add_argument("--data-dir", help="where --standard writes its data (default: a temporary directory)")
    parser.add_argument("--loss-parity", action="append", default=[], metavar="A,B",
                        help="compare the loss curves of two runs (same seed): variant names, or "
                             "tree/variant across trees (reference/plain,after/plain)")
    parser.add_argument("--warm-only", action="store_true",
                        help="only compile: a few steps of every run, all at once (fills Triton's cache)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="e2e_"))
    overrides = overrides_from_args(args)
    variant_texts = args.variant
    if args.standard:
        data = write_standard_data(Path(args.data_dir) if args.data_dir else work / "data")
        overrides = STANDARD_FLAGS + [(["data", "path"], str(data))] + overrides
        variant_texts = variant_texts or STANDARD_VARIANTS
    variants = [parse_variant(text) for text in variant_texts] or [{"name": "default", "overrides": []}]
    spec = {
        "config": args.config, "overrides": overrides, "variants": variants, "warmup": args.warmup,
        "steps": args.steps, "profile_steps": args.profile_steps, "matmul_size": args.matmul_size,
        "trace_dir": str(work),
    }
    trees = _trees(args)
    if args.warm_only:
        runs = [(label, tree, extra, v["name"]) for label, tree, extra, picked in trees for v in variants
                if picked is None or v["name"] in picked]
        return warm_caches(runs, spec, work)
    rows, ceilings = {}, {}
    for label, tree, extra, only in trees:
        names = [v["name"] for v in variants if not only or v["name"] in only]
        result = run_tree(tree, {**spec, **extra}, work, label, names)
        ceilings[label] = result.get("matmul_ceiling_tflops")
        for variant in variants:
            name = variant["name"]
            if only and name not in only:
                continue
            run = result["variants"].get(name, {"error": "not run"})
            if "window_s" not in run:
                rows[(label, name)] = run
                continue
            config = resolve_config(args.config, overrides + variant["overrides"])
            model_config = make_plan(config, world_size=1).model_config
            flops = [step_flops(model_config, step).total for step in run["micro_batch_lengths"]]
            peak = args.peak_tflops or peak_tflops(run["device"])
            rows[(label, name)] = summarize(run, flops, peak=peak, ceiling=ceilings[label])
    parity = [loss_parity(rows, *pair.split(",")) for pair in args.loss_parity]
    table = markdown(rows)
    print(table)
    for (tree, name), row in rows.items():
        if "idle_ms" in row:
            by_phase = ", ".join(f"{phase} {ms:.2f}" for phase, ms in row["idle_ms_by_next_phase"].items())
            print(f"{tree}/{name}: GPU idle {row['idle_ms']:.2f} ms per profiled step, {row['idle_ms_after_waits']:.2f} "
                  f"of it after a device wait; by the phase of the kernel that ends the gap: {by_phase}")
    for item in parity:
        first, second = item["runs"]
        if "missing" in item:
            print(f"loss parity {first} vs {second}: not run ({', '.join(item['missing'])})")
        else:
            print(f"loss parity {first} vs {second}: max rel diff {item['max_rel_diff']:.2e} "
                  f"(mean {item['mean_rel_diff']:.2e}) over {item['steps']} steps")
    summary = {
        "matmul_ceiling_tflops": ceilings,
        "rows": [{"tree": tree, "variant": name, **row} for (tree, name), row in rows.items()],
        "loss_parity": parity,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
