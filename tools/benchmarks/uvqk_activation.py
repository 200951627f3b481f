#!/usr/bin/env python3
"""The STU layer's UVQK activation (bias add, SiLU, per-head split, and their backward):
the fused Triton op against the unfused torch ops it replaced, forward and backward on
random bf16 inputs at 4 heads x (256 + 256 + 256 + 256).

    python tools/benchmarks/uvqk_activation.py [--tokens 64,11147] [--reps 200]

Per token count and implementation: wall milliseconds per forward + backward over
``--reps`` calls between two device synchronisations (bound by the host at small counts,
by the device at large ones) and the main thread's CPU milliseconds per call (the forward's
host work and the call into the backward; the backward's launches run on autograd's
device thread and are not in it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SPLIT = (256, 256, 256, 256)
HEADS = 4


def unfused(x, bias):
    """What the STU layer ran before: the linear's bias add, the SiLU, the split views."""
    return torch.split(F.silu(x + bias).view(x.shape[0], HEADS, sum(SPLIT)), SPLIT, -1)


def fused(x, bias):
    from megatron_gr.ops.uvqk_activation import uvqk_activation

    return uvqk_activation(x, bias, heads=HEADS, split_sizes=SPLIT, kernel="triton")


def time_calls(fn, tokens: int, reps: int) -> tuple[float, float]:
    width = HEADS * sum(SPLIT)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(tokens, HEADS, d, device="cuda", dtype=torch.bfloat16) for d in SPLIT]

    def call():
        torch.autograd.backward(fn(x, bias), grads)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        call()
    cpu = time.thread_time() - cpu
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    return wall / reps * 1e3, cpu / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="64,11147", help="comma-separated token counts")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("uvqk_activation.py times CUDA kernels: run it on a GPU")
    print("| tokens | implementation | wall ms per forward + backward | main-thread CPU ms |")
    print("|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, fn in (("fused (Triton)", fused), ("unfused (torch)", unfused)):
            wall, cpu = time_calls(fn, tokens, args.reps)
            print(f"| {tokens} | {name} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
