#!/usr/bin/env python3
"""Host time of a training step: the retrieval model's structure at tiny sizes, so that a
step's wall time is (almost) all host work (Python, dispatch, autograd, megatron's
wrappers, the optimizer, bookkeeping), plus the aten operators a step dispatches and the
places where it reads the device from the host.

    python tools/benchmarks/host_overhead.py                      # plain, bias, dynamic on this device
    python tools/benchmarks/host_overhead.py --variants plain --steps 50 --json host.json
    python tools/benchmarks/host_overhead.py --kernel-backend triton --device cuda   # on a GPU
    python tools/benchmarks/host_overhead.py --variants dlrm,ultra   # the ranking models

Per variant: ``--warmup`` steps, ``--steps`` timed steps (median wall ms per step, the device
synchronised after each step on a GPU; and the median CPU time of the training thread, which
other processes on a shared machine disturb less than the wall clock), as many again timed
by phase (the batches, forward, backward, gradient reduction, optimizer, the rest), then ``--profile-steps`` steps under
torch.profiler (aten operators per step: every dispatched one, and the top-level ones, which
is about what a GPU launches) and the same number under a torch function mode that records
every host read of a tensor (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``,
``float(t)``, ``nonzero``, ``unique``, ``bincount``, boolean indexing, ``torch.tensor(host
 values, device=...)``: a blocking copy on a GPU, ...) with the line of
the project or megatron-core that made it (on a GPU each of those waits for the device),
and the Triton kernels launched, by name (``--kernel-backend triton``: on a GPU, or on a
CPU under ``TRITON_INTERPRET=1``, where the interpreter's own operators swell the aten
counts and the times mean nothing). On a GPU it also lists the synchronising CUDA calls
that torch's sync debug mode reports, by line.

On the CPU the numbers are a proxy: the pytorch attention reference dispatches far more
operators than the one Triton launch it stands for, Triton's Python launch overhead is not
there, and the CPU mode (``megatron_gr/compat/cpu_mode.py``) adds a torch function mode to
every torch call of the step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
from step_timing import under_aten_op  # the sibling helper (this directory is on sys.path when run)
from torch.overrides import TorchFunctionMode

TINY = [
    (["model", "num_layers"], 8), (["model", "hidden_size"], 64), (["model", "num_attention_heads"], 2),
    (["model", "qk_head_dim"], 32), (["model", "v_head_dim"], 32), (["model", "max_seq_len"], 32),
    (["training", "micro_batch_size"], 8), (["training", "precision"], "fp32"),
    (["data", "synthetic", "num_users"], 256), (["data", "synthetic", "num_items"], 1000),
    (["data", "synthetic", "max_length"], 35), (["data", "synthetic", "mean_length"], 20.0),
    (["logging", "progress"], "off"), (["training", "eval_interval"], 0),
]
"""8 STU layers as in the standard shape (docs/benchmarks/e2e.md), hidden 64, 2 heads x 32,
histories of at most 32 tokens, 8 users per micro-batch: compute is negligible on a CPU."""
VARIANTS = {
    "plain": [(["model", "relative_attention_bias"], False)],
    "bias": [(["model", "relative_attention_bias"], True)],
    "dynamic": [(["model", "relative_attention_bias"], False), (["embeddings", "item", "type"], "dynamic"),
                (["embeddings", "item", "dynamic", "capacity"], 4096)],
}
RANKING_TINY = [
    (["training", "micro_batch_size"], 8), (["training", "precision"], "fp32"),
    (["data", "ranking", "synthetic", "num_users"], 256), (["logging", "progress"], "off"),
    (["training", "eval_interval"], 0),
]
"""The ranking configs as they are (2 layers x 64, histories of up to 144 events + 8
candidates; ULTRA-HSTU: channels imp 2x64 and click 2x32, SLA, truncation after layer 1,
recompute_uvqk/normed_x), 8 users per micro-batch, fp32."""
RANKING_VARIANTS = {
    "dlrm": Path("configs/dlrm_hstu_synthetic.yaml"),
    "ultra": Path("configs/ultra_hstu_synthetic.yaml"),
}
"""Ranking variants: the config each one loads (relative to the repository root)."""
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique", "aten::_unique2",
            "aten::unique_consecutive", "aten::masked_select", "aten::bincount", "aten::equal", "aten::allclose")
"""aten operators that read device memory on the host (on a CUDA tensor each one waits)."""
_HOST_READS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu", torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float", torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index", torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero",
    torch.unique: "unique", torch.Tensor.unique: "unique", torch.bincount: "bincount", torch.Tensor.bincount: "bincount",
    torch.masked_select: "masked_select", torch.equal: "equal", torch.allclose: "allclose",
}


def _caller() -> str:
    """The first frame outside torch (and this file): who asked."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and name != __file__:
            parts = Path(name).parts
            for root in ("megatron_gr", "megatron", "tools"):
                if root in parts:
                    name = "/".join(parts[parts.index(root):])
                    break
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor by the Python code of a step, with its caller."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _HOST_READS.get(func)
        if kind is None and func is torch.Tensor.__getitem__ and len(args) > 1 and _has_bool_index(args[1]):
            kind = "bool-index"
        if kind is None and func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            kind = "tensor-to-device"  # on a GPU: a blocking copy from the host (non_blocking=False)
        if kind is None and func is torch.repeat_interleave and "output_size" not in kwargs and _is_tensor_arg(args):
            kind = "repeat_interleave"
        if kind is not None:
            self.counts[(kind, _caller())] += 1
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_tensor_arg(args) -> bool:
    return len(args) > 1 and isinstance(args[1], torch.Tensor)


@contextlib.contextmanager
def triton_launches() -> Iterator[collections.Counter]:
    """Counts Triton kernel launches by kernel name inside the block (compiled kernels on a
    GPU, interpreted ones under ``TRITON_INTERPRET=1``); empty without Triton."""
    counts: collections.Counter = collections.Counter()
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield counts
        return
    classes = [jit.JITFunction, getattr(interpreter, "InterpretedFunction", None)]
    originals = {cls: cls.run for cls in classes if cls is not None}

    def counting(original):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counts[getattr(self.fn, "__name__", "?")] += 1
            return original(self, *args, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        yield counts
    finally:
        for cls, original in originals.items():
            cls.run = original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _timed(owner, name: str, totals: collections.Counter) -> Iterator[None]:
    """``owner.name`` (a function) adds its wall time to ``totals[name]`` inside the block."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - begin

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _phases(trainer, steps: int) -> dict:
    """Host ms per step in each phase of the step: the batches, megatron's forward step (the
    model and its loss), its backward step, the gradient reduction and per-token division
    (``finalize_model_grads``), the optimizer with the dynamic tables (which holds the
    step's wait for the gradient norm on a GPU), and the rest of ``train_step``."""
    from megatron.core.pipeline_parallel import schedules

    totals: collections.Counter = collections.Counter()
    config = trainer.model[0].config
    with contextlib.ExitStack() as stack:
        stack.enter_context(_timed(trainer.loader, "next_step", totals))
        stack.enter_context(_timed(schedules, "forward_step", totals))
        stack.enter_context(_timed(schedules, "backward_step", totals))
        stack.enter_context(_timed(config, "finalize_model_grads_func", totals))
        stack.enter_context(_timed(trainer.sparse, "step", totals))
        stack.enter_context(_timed(trainer, "train_step", totals))
        for _ in range(steps):
            trainer.train_step()
    phases = {name: totals[key] * 1e3 / steps for name, key in (
        ("batches", "next_step"), ("forward", "forward_step"), ("backward", "backward_step"),
        ("finalize_grads", "finalize_model_grads_func"), ("optimizer", "step"))}
    phases["rest"] = totals["train_step"] * 1e3 / steps - sum(phases.values())
    return phases


def _cuda_syncs(trainer, steps: int) -> dict:
    """Every synchronising CUDA call of ``steps`` steps, by the Python line that made it
    (torch's sync debug mode: what the device really waited for, C++ callers included)."""
    counts: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            counts[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return {where: n / steps for where, n in counts.most_common()}


def _profile(trainer, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if not under_aten_op(e)]
    names = collections.Counter(e.name for e in top)
    return {
        "aten_ops_per_step": len(events) / steps,
        "top_level_aten_ops_per_step": len(top) / steps,
        "sync_ops_per_step": {name: n / steps for name, n in collections.Counter(
            e.name for e in events if e.name in SYNC_OPS).items()},
        "top_ops": {name: n / steps for name, n in names.most_common(25)},
    }


def measure(variant: str, *, args) -> dict:
    from megatron_gr.config import resolve_config
    from megatron_gr.training.trainer import Trainer

    total = args.warmup + 2 * args.steps + 2 * args.profile_steps
    config_file = RANKING_VARIANTS.get(variant)
    base = TINY + VARIANTS[variant] if config_file is None else RANKING_TINY
    overrides = base + [
        (["training", "kernel_backend"], args.kernel_backend), (["training", "device"], args.device),
        (["training", "train_iters"], total), (["training", "prefetch_batches"], not args.no_prefetch),
    ]
    if config_file is not None:
        config_file = str(Path(__file__).resolve().parents[2] / config_file)
    trainer = Trainer(resolve_config(config_file, overrides))
    device = trainer.runtime.device
    for _ in range(args.warmup):
        trainer.train_step()
    _sync(device)
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        begin, begin_cpu = time.perf_counter(), time.thread_time()
        losses.append(trainer.train_step()["loss"])
        _sync(device)
        cpu_times.append((time.thread_time() - begin_cpu) * 1e3)
        times.append((time.perf_counter() - begin) * 1e3)
    result = {"variant": variant, "device": str(device), "host_ms_per_step": statistics.median(times),
              "host_ms_min": min(times), "thread_cpu_ms_per_step": statistics.median(cpu_times), "losses": losses}
    result["phase_ms_per_step"] = _phases(trainer, args.steps)
    result.update(_profile(trainer, args.profile_steps))
    reads = HostReads()
    with reads, triton_launches() as launches:
        for _ in range(args.profile_steps):
            trainer.train_step()
    result["triton_launches_per_step"] = {name: n / args.profile_steps for name, n in launches.most_common()}
    if device.type == "cuda":
        result["cuda_syncs_per_step"] = _cuda_syncs(trainer, args.profile_steps)
    result["host_reads_per_step"] = {
        f"{kind} @ {where}": n / args.profile_steps for (kind, where), n in sorted(reads.counts.items(), key=lambda kv: -kv[1])
    }
    trainer.loader.close()
    return result


def print_result(result: dict, top: int) -> None:
    print(f"\n== {result['variant']} ({result['device']}): {result['host_ms_per_step']:.2f} ms/step "
          f"(min {result['host_ms_min']:.2f}; training thread CPU {result['thread_cpu_ms_per_step']:.2f}), aten ops/step {result['aten_ops_per_step']:.0f} "
          f"(top-level {result['top_level_aten_ops_per_step']:.0f})")
    print("   host ms per step by phase:", {k: round(v, 2) for k, v in result["phase_ms_per_step"].items()})
    print("   sync ops/step:", {k: round(v, 1) for k, v in result["sync_ops_per_step"].items()} or "none")
    print("   host reads per step (Python side):")
    for where, n in result["host_reads_per_step"].items():
        print(f"     {n:6.1f}  {where}")
    if result["triton_launches_per_step"]:
        launches = result["triton_launches_per_step"]
        print(f"   Triton launches per step: {sum(launches.values()):.0f}", {k: round(v, 1) for k, v in launches.items()})
    if "cuda_syncs_per_step" in result:
        print("   CUDA synchronisations per step (sync debug mode):", result["cuda_syncs_per_step"] or "none")
    print(f"   top-level aten ops per step (top {top}):")
    for name, n in list(result["top_ops"].items())[:top]:
        print(f"     {n:7.1f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="plain,bias,dynamic", help=f"comma-separated, of {', '.join([*VARIANTS, *RANKING_VARIANTS])} "
                        "(dlrm, ultra: the ranking models of configs/*_hstu_synthetic.yaml)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--kernel-backend", default="pytorch", choices=("pytorch", "triton", "auto"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--no-prefetch", action="store_true", help="training.prefetch_batches=false")
    parser.add_argument("--top", type=int, default=12, help="top-level aten operators to print")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for variant in args.variants.split(","):
        results.append(measure(variant, args=args))
        print_result(results[-1], args.top)
    from megatron_gr.training.runtime import shutdown

    shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
