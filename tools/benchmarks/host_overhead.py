#!/usr/bin/env python3
"""Host time of a training step: the retrieval model's structure at tiny sizes, so that a
step's wall time is (almost) all host work (Python, dispatch, autograd, megatron's
wrappers, the optimizer, bookkeeping), plus the aten operators a step dispatches and the
places where it reads the device from the host.

    python tools/benchmarks/host_overhead.py                      # plain, bias, dynamic on this device
    python tools/benchmarks/host_overhead.py --variants plain --steps 50 --json host.json
    python tools/benchmarks/host_overhead.py --kernel-backend triton --device cuda   # on a GPU
    python tools/benchmarks/host_overhead.py --variants dlrm,ultra   # the ranking models
    MEGATRON_GR_ML100K=DIR python tools/benchmarks/host_overhead.py --variants ml100k --graphs layers

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

``--graphs layers`` replays the STU layers from graphs (``training.cuda_graphs: layers``; on
the CPU emulated graphs, ``apply_cuda_graphs(..., emulate=True)``, which run the layers'
work again): the layers' work is then its own phase, ``layers``, and every other number
(``outside_layers``: thread CPU ms and aten operators per step, by phase) is what stays
eager around the replayed layers. Phase times and operators are exclusive: what a
nested phase does is not counted in the phase around it.

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
import os
import statistics
import sys
import time
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
ML100K_TINY = [
    (["training", "micro_batch_size"], 4), (["model", "max_seq_len"], 16), (["training", "precision"], "fp32"),
    (["logging", "progress"], "off"), (["training", "eval_interval"], 0),
]
"""``configs/hstu_ml100k.yaml`` as it is (4 STU layers x 64, one head, query-time buckets,
token-origin time bias, dropout 0.5, the full softmax over its 1682 items) on ML-100K
($MEGATRON_GR_ML100K), with 4 users of at most 16 events per micro-batch, fp32: the loss over the
whole corpus is still real work on a CPU, kept small so that the step is mostly host work."""
CONFIG_VARIANTS = {
    "dlrm": (Path("configs/dlrm_hstu_synthetic.yaml"), RANKING_TINY),
    "ultra": (Path("configs/ultra_hstu_synthetic.yaml"), RANKING_TINY),
    "ml100k": (Path("configs/hstu_ml100k.yaml"), ML100K_TINY),
}
"""Variants that load a config: the file (relative to the repository root) and its overrides."""
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique", "aten::_unique2",
            "aten::unique_consecutive", "aten::masked_select", "aten::bincount", "aten::equal", "aten::allclose")
"""aten operators that read device memory on the host (on a CUDA tensor each one waits)."""
PHASES = ("batches", "forward", "layers", "backward", "finalize_grads", "optimizer", "rest")
"""The phases of a step (:func:`step_phases`), in the order they run."""
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


class PhaseClock:
    """Wall and training-thread CPU seconds of each phase of a step, exclusive (time in a
    nested phase counts for that phase only), each phase also a profiler range named
    ``phase/<name>`` so that operators can be charged to the innermost phase."""

    def __init__(self):
        self.wall: collections.Counter = collections.Counter()
        self.cpu: collections.Counter = collections.Counter()
        self._open: list[list[float]] = []  # per open phase: the time its nested phases took

    @contextlib.contextmanager
    def timing(self, owner, name: str, phase: str) -> Iterator[None]:
        """``owner.name`` (a function) counts as ``phase`` inside the block."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._open.append([0.0, 0.0])
            begin, begin_cpu = time.perf_counter(), time.thread_time()
            try:
                with torch.profiler.record_function(f"phase/{phase}"):
                    return original(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - begin, time.thread_time() - begin_cpu
                nested_wall, nested_cpu = self._open.pop()
                self.wall[phase] += wall - nested_wall
                self.cpu[phase] += cpu - nested_cpu
                if self._open:
                    self._open[-1][0] += wall
                    self._open[-1][1] += cpu

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)


@contextlib.contextmanager
def step_phases(trainer, clock: PhaseClock) -> Iterator[None]:
    """The phases of ``trainer``'s steps timed by ``clock`` inside the block: the batches,
    megatron's forward step (the model and its loss), its backward step, the gradient
    reduction and per-token division (``finalize_model_grads``), the optimizer with the
    dynamic tables (``step_verdict``: decided on the host, it holds the step's wait for the
    gradient norm on a GPU), the rest
    of ``train_step``; and with graphed layers their replays (``layers``: forward and
    backward), which nest in the forward and backward steps."""
    from megatron.core.pipeline_parallel import schedules

    from megatron_gr.training import cuda_graphs

    with contextlib.ExitStack() as stack:
        stack.enter_context(clock.timing(trainer, "train_step", "rest"))
        stack.enter_context(clock.timing(trainer.loader, "next_step", "batches"))
        stack.enter_context(clock.timing(schedules, "forward_step", "forward"))
        stack.enter_context(clock.timing(schedules, "backward_step", "backward"))
        stack.enter_context(clock.timing(trainer.model[0].config, "finalize_model_grads_func", "finalize_grads"))
        stack.enter_context(clock.timing(trainer.verdict, "launch", "optimizer"))
        graph = cuda_graphs._EmulatedGraph if trainer.runtime.device.type == "cpu" else torch.cuda.CUDAGraph
        stack.enter_context(clock.timing(graph, "replay", "layers"))
        yield


def _phases(trainer, steps: int) -> dict:
    """Median wall and thread CPU ms per step of each phase (:func:`step_phases`), and of
    everything but the graphed layers (``outside_layers``)."""
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(steps):
        clock = PhaseClock()
        with step_phases(trainer, clock):
            trainer.train_step()
        for phase in PHASES:
            wall[phase].append(clock.wall[phase] * 1e3)
            cpu[phase].append(clock.cpu[phase] * 1e3)
        wall["outside_layers"].append(sum(clock.wall.values()) * 1e3 - wall["layers"][-1])
        cpu["outside_layers"].append(sum(clock.cpu.values()) * 1e3 - cpu["layers"][-1])
    return {
        "phase_ms_per_step": {phase: statistics.median(times) for phase, times in wall.items()},
        "phase_cpu_ms_per_step": {phase: statistics.median(times) for phase, times in cpu.items()},
    }


def _phase_of(event) -> str:
    """The innermost phase (:func:`step_phases`) a profiler event ran in."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("phase/"):
            return parent.name[len("phase/"):]
        parent = parent.cpu_parent
    return "rest"


def _profile(trainer, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, step_phases(trainer, PhaseClock()):
        for _ in range(steps):
            trainer.train_step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if not under_aten_op(e)]
    phases = {e.id: _phase_of(e) for e in events}
    outside = [e for e in top if phases[e.id] != "layers"]
    by_phase = collections.Counter(phases[e.id] for e in top)
    return {
        "aten_ops_per_step": len(events) / steps,
        "top_level_aten_ops_per_step": len(top) / steps,
        "outside_layers_aten_ops_per_step": sum(phases[e.id] != "layers" for e in events) / steps,
        "outside_layers_top_level_aten_ops_per_step": len(outside) / steps,
        "top_level_aten_ops_per_step_by_phase": {phase: by_phase[phase] / steps for phase in PHASES},
        "sync_ops_per_step": {name: n / steps for name, n in collections.Counter(
            e.name for e in events if e.name in SYNC_OPS).items()},
        "top_ops": {name: n / steps for name, n in collections.Counter(e.name for e in top).most_common(25)},
        "top_ops_outside_layers": {
            name: n / steps for name, n in collections.Counter(e.name for e in outside).most_common(25)
        },
    }


def _trainer(variant: str, *, args):
    """The variant's trainer; with ``--graphs layers`` its layers graphed (emulated on the CPU)."""
    from megatron_gr.config import resolve_config
    from megatron_gr.training.trainer import Trainer

    total = args.warmup + 2 * args.steps + 2 * args.profile_steps
    config_file, base = CONFIG_VARIANTS.get(variant, (None, TINY + VARIANTS.get(variant, [])))
    overrides = base + [
        (["training", "kernel_backend"], args.kernel_backend), (["training", "device"], args.device),
        (["training", "train_iters"], total), (["training", "prefetch_batches"], not args.no_prefetch),
    ]
    if variant == "ml100k":
        if not os.environ.get("MEGATRON_GR_ML100K"):
            raise SystemExit("--variants ml100k reads ML-100K from $MEGATRON_GR_ML100K (the directory holding u.data)")
        overrides.append((["data", "path"], os.environ["MEGATRON_GR_ML100K"]))
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    emulated = args.graphs != "none" and on_cpu
    if args.graphs != "none" and not emulated:
        overrides.append((["training", "cuda_graphs"], args.graphs))
    if config_file is not None:
        config_file = str(Path(__file__).resolve().parents[2] / config_file)
    trainer = Trainer(resolve_config(config_file, overrides))
    if emulated:  # the plan refuses graphs on the CPU: applied here as the CPU tests do
        from megatron_gr.training.cuda_graphs import apply_cuda_graphs
        from megatron_gr.training.model_setup import unwrap

        training = trainer.config.training
        apply_cuda_graphs(unwrap(trainer.model[0]), mode=args.graphs, max_tokens=training.cuda_graph_max_tokens,
                          micro_batch_size=training.micro_batch_size, num_slots=1, sequence_parallel_size=1,
                          emulate=True)
    return trainer


def python_profile(trainer, steps: int, top: int) -> list[dict]:
    """The ``top`` functions of the project, megatron-core and Triton's launcher by
    cumulative time per step under cProfile (which slows every call, so compare functions
    with each other, not with the step's time)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        trainer.train_step()
    _sync(trainer.runtime.device)
    profiler.disable()
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        where = next((path[path.index(k):] for k in ("megatron_gr/", "megatron/core/", "triton/runtime/") if k in path), None)
        if where is not None:
            rows.append({"function": f"{name} ({where}:{line})", "calls_per_step": calls / steps,
                         "cumulative_ms_per_step": cumulative * 1e3 / steps, "own_ms_per_step": own * 1e3 / steps})
    return sorted(rows, key=lambda row: -row["cumulative_ms_per_step"])[:top]


def measure(variant: str, *, args) -> dict:
    trainer = _trainer(variant, args=args)
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
    result = {"variant": variant, "graphs": args.graphs, "device": str(device),
              "host_ms_per_step": statistics.median(times), "host_ms_min": min(times),
              "thread_cpu_ms_per_step": statistics.median(cpu_times), "losses": losses}
    result.update(_phases(trainer, args.steps))
    result.update(_profile(trainer, args.profile_steps))
    reads = HostReads()
    with reads, triton_launches() as launches:
        for _ in range(args.profile_steps):
            trainer.train_step()
    result["triton_launches_per_step"] = {name: n / args.profile_steps for name, n in launches.most_common()}
    if device.type == "cuda":
        from megatron_gr.training.device_waits import device_waits

        waits = device_waits(trainer, args.profile_steps)
        result["cuda_syncs_per_step"] = {f"{name}:{line}": n for (name, line), n in waits.items()}
    result["host_reads_per_step"] = {
        f"{kind} @ {where}": n / args.profile_steps for (kind, where), n in sorted(reads.counts.items(), key=lambda kv: -kv[1])
    }
    if args.python_profile:
        result["python_profile"] = python_profile(trainer, args.profile_steps, args.python_profile)
    trainer.loader.close()
    return result


def print_result(result: dict, top: int) -> None:
    print(f"\n== {result['variant']} ({result['device']}): {result['host_ms_per_step']:.2f} ms/step "
          f"(min {result['host_ms_min']:.2f}; training thread CPU {result['thread_cpu_ms_per_step']:.2f}), aten ops/step {result['aten_ops_per_step']:.0f} "
          f"(top-level {result['top_level_aten_ops_per_step']:.0f})")
    print("   host ms per step by phase (medians):", {k: round(v, 2) for k, v in result["phase_ms_per_step"].items()})
    print("   thread CPU ms per step by phase (medians):", {k: round(v, 2) for k, v in result["phase_cpu_ms_per_step"].items()})
    print("   top-level aten ops per step by phase:",
          {k: round(v, 1) for k, v in result["top_level_aten_ops_per_step_by_phase"].items()})
    print(f"   outside the graphed layers: aten ops/step {result['outside_layers_aten_ops_per_step']:.0f} "
          f"(top-level {result['outside_layers_top_level_aten_ops_per_step']:.0f}), thread CPU ms/step "
          f"{result['phase_cpu_ms_per_step']['outside_layers']:.2f}")
    print("   sync ops/step:", {k: round(v, 1) for k, v in result["sync_ops_per_step"].items()} or "none")
    print("   host reads per step (Python side):")
    for where, n in result["host_reads_per_step"].items():
        print(f"     {n:6.1f}  {where}")
    if result["triton_launches_per_step"]:
        launches = result["triton_launches_per_step"]
        print(f"   Triton launches per step: {sum(launches.values()):.0f}", {k: round(v, 1) for k, v in launches.items()})
    if "cuda_syncs_per_step" in result:
        print("   CUDA synchronisations per step (sync debug mode):", result["cuda_syncs_per_step"] or "none")
    if "python_profile" in result:
        print("   Python functions by cumulative ms per step under cProfile (calls/step, own ms/step):")
        for row in result["python_profile"]:
            print(f"     {row['cumulative_ms_per_step']:8.2f}  {row['function']}  "
                  f"({row['calls_per_step']:.0f}, {row['own_ms_per_step']:.2f})")
    ops = result["top_ops_outside_layers"] if result["graphs"] != "none" else result["top_ops"]
    print(f"   top-level aten ops per step{' outside the layers' if result['graphs'] != 'none' else ''} (top {top}):")
    for name, n in list(ops.items())[:top]:
        print(f"     {n:7.1f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="plain,bias,dynamic", help=f"comma-separated, of {', '.join([*VARIANTS, *CONFIG_VARIANTS])} "
                        "(dlrm, ultra: the ranking models of configs/*_hstu_synthetic.yaml; ml100k: "
                        "configs/hstu_ml100k.yaml on $MEGATRON_GR_ML100K)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--kernel-backend", default="pytorch", choices=("pytorch", "triton", "auto"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--graphs", default="none", choices=("none", "layers"),
                        help="training.cuda_graphs (on the CPU emulated graphs); the layers' work is the phase 'layers'")
    parser.add_argument("--no-prefetch", action="store_true", help="training.prefetch_batches=false")
    parser.add_argument("--top", type=int, default=12, help="top-level aten operators to print")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's); on a shared "
                        "machine 1 keeps idle intra-op threads' spinning out of the training thread's CPU time")
    parser.add_argument("--python-profile", type=int, default=0, metavar="N",
                        help="also run the profiled steps under cProfile and print the N functions (of this "
                        "project, megatron-core, Triton's launcher) with the most cumulative time per step")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
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
