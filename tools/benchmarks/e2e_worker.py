#!/usr/bin/env python3
"""Runs the training steps that ``e2e_step.py`` measures, in one process, with whatever
``megatron_gr`` is first on ``PYTHONPATH`` (this tree, or an older checkout for the
"before" rows). It uses only the trainer's public surface (``resolve_config``,
``Trainer.train_step``, ``trainer.loader.next_step``, ``trainer.sparse.step``; where a tree
has them, ``launch_step``/``settle_step`` as its training loop runs steps and
``trainer.verdict.launch``), so older trees run it unchanged; FLOPs and phases are
computed by the driver.

    python tools/benchmarks/e2e_worker.py SPEC.json RESULT.json

SPEC: {"config": path or null, "overrides": [[path, value], ...], "variants": [{"name",
"overrides"}], "only": [names] or null, "warmup", "steps", "profile_steps", "matmul_size",
"trace_dir", "reference_step": bool (this tree with its step speed-ups off: reference_step.py)}.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch
from step_timing import record_step_batches  # the sibling helper (this directory is on sys.path when run)

ANNOTATION_OPTIMIZER = "e2e::optimizer"
ANNOTATION_LOSS = "e2e::loss"
ANNOTATION_EMBEDDINGS = "e2e::embeddings"


def matmul_ceiling_tflops(size: int, reps: int = 10) -> float:
    """bf16 ``[size, size] x [size, size]`` products per second on this GPU, in TFLOP/s."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def _annotated(function, name: str):
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return function(*args, **kwargs)

    return run


def _annotate(trainer) -> None:
    """Host ranges around the optimizer step, the loss and the embedding lookups (the
    phases ``step_phases.py`` reads); the computation is unchanged."""
    import megatron_gr.models.hstu_retrieval as retrieval

    if hasattr(trainer, "verdict"):
        trainer.verdict.launch = _annotated(trainer.verdict.launch, ANNOTATION_OPTIMIZER)
    else:  # trees before the step's verdict moved to the device
        trainer.sparse.step = _annotated(trainer.sparse.step, ANNOTATION_OPTIMIZER)
    if not getattr(retrieval.sampled_softmax_loss, "_e2e_annotated", False):
        retrieval.sampled_softmax_loss = _annotated(retrieval.sampled_softmax_loss, ANNOTATION_LOSS)
        retrieval.sampled_softmax_loss._e2e_annotated = True
    for chunk in trainer.model:
        for module in chunk.modules():
            for name in ("item_table", "preprocessor"):
                target = getattr(module, name, None)
                if isinstance(target, torch.nn.Module) and not getattr(target, "_e2e_annotated", False):
                    target.forward = _annotated(target.forward, ANNOTATION_EMBEDDINGS)
                    target._e2e_annotated = True


def _lengths(batches) -> list[list[int]]:
    return [(b.offsets[1:] - b.offsets[:-1]).cpu().tolist() for b in batches]


class _Steps:
    """Steps as the tree's training loop runs them: each step's record read while the next
    one runs (``launch_step``), or, in trees without it, every step read at its end."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.pipelined = hasattr(trainer, "launch_step")

    def launch(self) -> list[dict]:
        """Runs one step; the records that became known (none, or one)."""
        if not self.pipelined:
            return [self.trainer.train_step()]
        previous = self.trainer.launch_step()
        return [] if previous is None else [previous]

    def finish(self) -> list[dict]:
        """The record of the step still in flight, if any."""
        return [self.trainer.settle_step()] if self.pipelined else []


def measure(trainer, *, warmup: int, steps: int, profile_steps: int, trace_path: Path) -> dict:
    cuda = trainer.runtime.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    taken = record_step_batches(trainer)
    _annotate(trainer)
    losses = []
    for _ in range(warmup):
        losses.append(trainer.train_step()["loss"])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    taken.clear()
    records = []
    host_step_s = []
    # Each step's span on the device's timeline, from events (no extra wait): an outlier
    # step shows here, where the window's mean hides it.
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    start = time.perf_counter()
    runner = _Steps(trainer)
    for index in range(steps):
        if cuda:
            marks[index].record()
        begin = time.perf_counter()
        records += runner.launch()
        host_step_s.append(time.perf_counter() - begin)
    if cuda:
        marks[-1].record()
    records += runner.finish()
    sync()
    window = time.perf_counter() - start
    device_step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    timed_batches = list(taken)
    losses += [float(r["loss"]) for r in records]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    trace = None
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(profile_steps):
                losses += [float(r["loss"]) for r in runner.launch()]
            losses += [float(r["loss"]) for r in runner.finish()]
            sync()
        prof.export_chrome_trace(str(trace_path))
        trace = str(trace_path)
    return {
        **_graph_statistics(trainer),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "window_s": window,
        "steps": steps,
        "host_step_s": host_step_s,
        "device_step_ms": device_step_ms,
        "tokens": [int(r["tokens"]) for r in records],
        "micro_batch_lengths": [_lengths(batches) for batches in timed_batches],
        "peak_memory_gib": peak,
        "losses": losses,
        "profiled_steps": profile_steps,
        "trace": trace,
    }


def _graph_statistics(trainer) -> dict:
    """The CUDA graph runner's counters (trees without training.cuda_graphs: none)."""
    try:
        from megatron_gr.training.cuda_graphs import graph_runner
        from megatron_gr.training.model_setup import unwrap
    except ImportError:
        return {}
    runner = graph_runner(unwrap(trainer.model[0]))
    return {"cuda_graphs": runner.statistics()} if runner is not None else {}


def run_length(config, total_steps: int) -> int:
    """``train_iters`` of a measured run: the steps it takes, longer where the config's LR
    warm-up needs it (a warm-up must end before the decay: ML-100K warms up over 50 steps),
    so the config is accepted as it is (the steps taken may all fall inside the warm-up: the
    timing does not depend on the rate). getattr: older trees run this too."""
    training = config.training
    length = max(total_steps, 2)
    if getattr(training, "lr_decay_iters", None) is None:  # the decay length is train_iters
        length = max(length, getattr(training, "lr_warmup_iters", 0) + 1)
    return length


def main(spec_path: str, result_path: str) -> int:
    from megatron_gr.config import resolve_config
    from megatron_gr.config.errors import ConfigError
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("reference_step"):
        from reference_step import speedups_off  # beside this file

        speedups_off().__enter__()  # for the whole process
    total_steps = spec["warmup"] + spec["steps"] + spec["profile_steps"]
    fixed = [(["logging", "progress"], "off"), (["training", "eval_interval"], 0)]
    result = {"matmul_ceiling_tflops": None, "variants": {}}
    if torch.cuda.is_available() and spec.get("matmul_size"):
        result["matmul_ceiling_tflops"] = matmul_ceiling_tflops(spec["matmul_size"])
    for variant in spec["variants"]:
        if spec.get("only") and variant["name"] not in spec["only"]:
            continue
        overrides = [tuple(o) for o in spec["overrides"]] + [tuple(o) for o in variant["overrides"]] + fixed
        try:
            probe = resolve_config(spec["config"], overrides + [(["training", "train_iters"], 2**31)])  # any warm-up fits
            length = run_length(probe, total_steps)
            trainer = Trainer(resolve_config(spec["config"], overrides + [(["training", "train_iters"], length)]))
        except ConfigError as error:  # a key this (older) tree does not know, a plan-time refusal
            result["variants"][variant["name"]] = {"skipped": str(error)}
            continue
        trace_path = Path(spec["trace_dir"]) / f"trace_{variant['name']}.json"
        result["variants"][variant["name"]] = measure(
            trainer, warmup=spec["warmup"], steps=spec["steps"], profile_steps=spec["profile_steps"], trace_path=trace_path
        )
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"e2e worker: {variant['name']} done", flush=True)
    with contextlib.suppress(Exception):
        shutdown()
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
