#!/usr/bin/env python3
"""Host work of one FP8 linear: aten operators and wall microseconds per forward + backward
at a tiny shape, where the compute is negligible and what is left is Python and dispatch.

    python tools/benchmarks/fp8_linear_host.py                   # CPU, pytorch cast kernel
    python tools/benchmarks/fp8_linear_host.py --json host.json --repeats 2000
    python tools/benchmarks/fp8_linear_host.py --device cuda --kernel triton   # on a GPU, bf16

Per recipe (and the plain ``F.linear`` for scale): ``--warmup`` calls (the delayed recipe
then runs from its history, as every call after a step's first does), the aten operators
of one call under torch.profiler (every dispatched one, nested included, and the top-level
ones), then the median over ``--rounds`` rounds of the mean time of ``--repeats`` calls: wall
and the thread's CPU time (which other processes on a shared machine disturb less). The
weight is cast in every call (``weight_cast=None``), as a step's first micro-batch does.
On a GPU (``--device cuda``: bf16 tensors) each round ends with a synchronisation, so a
call's time is the larger of its host and device time: the host's at this shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megatron_gr.transformer.fp8.linear import Fp8LinearState, fp8_linear
from megatron_gr.transformer.fp8.recipe import Fp8Recipe
from step_timing import under_aten_op  # the sibling helper (this directory is on sys.path when run)

RECIPES = ("tensorwise", "delayed", "rowwise")


def _runner(recipe: str, *, tokens: int, hidden: int, out_features: int, kernel: str, device: str = "cpu"):
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    def tensor(*shape, requires_grad=True):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    x, weight, bias = tensor(tokens, hidden), tensor(out_features, hidden), tensor(out_features)
    grad = tensor(tokens, out_features, requires_grad=False)
    if recipe == "plain":  # the plain linear (float32 on the CPU)

        def call():
            torch.nn.functional.linear(x, weight, bias).backward(grad)

        return call
    state = Fp8LinearState(Fp8Recipe(recipe=recipe, amax_history_len=4, amax_compute_algo="max"), kernel=kernel)

    def call():
        fp8_linear(x, weight, bias, state=state).backward(grad)

    return call


def _aten_ops(call) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not under_aten_op(e)]
    return len(events), len(top)


def measure(recipe: str, *, args) -> dict:
    call = _runner(recipe, tokens=args.tokens, hidden=args.hidden, out_features=args.out_features,
                   kernel=args.kernel, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        call()
    sync()
    aten, top = _aten_ops(call)
    wall, cpu = [], []
    for _ in range(args.rounds):
        begin, begin_cpu = time.perf_counter(), time.thread_time()
        for _ in range(args.repeats):
            call()
        sync()
        cpu.append((time.thread_time() - begin_cpu) / args.repeats * 1e6)
        wall.append((time.perf_counter() - begin) / args.repeats * 1e6)
    return {"recipe": recipe, "aten_ops": aten, "top_level_aten_ops": top, "wall_us": statistics.median(wall),
            "cpu_us": statistics.median(cpu)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--out-features", type=int, default=32)
    parser.add_argument("--kernel", default="pytorch", choices=("pytorch", "triton"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--recipes", nargs="+", default=["plain", *RECIPES], choices=["plain", *RECIPES])
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(recipe, args=args) for recipe in args.recipes]
    print(f"{args.tokens} x {args.hidden} -> {args.out_features} on {args.device}, kernel {args.kernel}, fwd+bwd, "
          "weight cast per call")
    print(f"{'recipe':<12}{'aten ops':>10}{'top-level':>11}{'wall us':>10}{'cpu us':>10}")
    for row in rows:
        print(f"{row['recipe']:<12}{row['aten_ops']:>10}{row['top_level_aten_ops']:>11}{row['wall_us']:>10.1f}"
              f"{row['cpu_us']:>10.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
