#!/usr/bin/env python3
"""Times each mHC op, the fused Triton kernels against the PyTorch reference, on random
inputs: the mappings (RMS norm + projection + gates + Sinkhorn-Knopp), Sinkhorn alone,
aggregate and merge (bias-dropout-add), the fused pre op (mappings + aggregate in one),
forward and backward, and their sums per sublayer: separate (mappings + aggregate + merge)
and fused (pre + merge). The fused pairs the blocks run on the Triton backend, each beside
the ops it replaces run one after the other (``+``; for Triton, the separate kernels):
``merge_pre`` / ``merge+pre`` (a merge and the next pre op, autograd adding the two
gradients of the merged streams in the separate case), ``expand_pre`` / ``expand+pre``
(the first pre op on the block input) and ``merge_contract`` / ``merge+contract`` (the
last merge and the mean of the streams). Prints a markdown table (and JSON with
``--json``); the bytes each pair's kernels move: ``tools/benchmarks/mhc_bytes.py``.

    python tools/benchmarks/mhc_ops.py [--streams 4] [--channels 512,1024,2048]
        [--tokens 16384,65536] [--dtype bf16] [--dropout 0.1] [--ops ...] [--impls pytorch,triton]
        [--candidates] [--json FILE]

Timing: CUDA events around each call after ``--warmup`` calls, median of ``--reps``; the
forward runs with autograd on (as in training), the backward alone through
``torch.autograd.grad`` on a retained graph. GB/s counts the bytes each op must move at
least (every input read once, every output written once; the streams in ``--dtype``, maps
in float32), the same for both implementations; the pre op's backward floor counts x
once, though its kernels read it twice (dh_pre must precede the projection gradient).
Separate ops' times include no autograd add of their two dx; the pre op's do not need one. ``--candidates`` also times the fused
kernels with the hand-picked alternative block sizes of ``CANDIDATES`` in
``megatron_gr/ops/triton/mhc_configs.py``. ``--device cpu`` runs the kernels in Triton's
interpreter on tiny shapes to check the tool itself (times meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from step_timing import time_us  # the sibling helper (this directory is on sys.path when run)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

OPS = ("mappings", "sinkhorn", "aggregate", "merge", "pre", "merge+pre", "merge_pre", "expand+pre", "expand_pre",
       "merge+contract", "merge_contract")
DEFAULT_OPS = OPS[:5]
SUBLAYERS = {"sublayer": ("mappings", "aggregate", "merge"), "sublayer (pre)": ("pre", "merge")}


def make_case(op, tokens, n, channels, dtype, device, *, dropout, iterations, seed=0):
    """``(forward(kernel) -> tuple of outputs, leaves, forward bytes, backward bytes)``."""
    from megatron_gr.ops.keyed_dropout import DropoutKeys
    from megatron_gr.ops.mhc import (
        input_expand,
        mhc_aggregate,
        mhc_expand_pre,
        mhc_mappings,
        mhc_merge,
        mhc_merge_contract,
        mhc_merge_pre,
        mhc_pre,
        output_contract,
        sinkhorn,
    )
    from megatron_gr.transformer.hyper_connection import initial_bias

    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, dt=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dt).requires_grad_()

    s, f = torch.finfo(dtype).bits // 8, 4
    streams, maps, width = tokens * n * channels * s, tokens * (n * n + 2 * n) * f, n * n + 2 * n
    hidden, small = tokens * channels * s, tokens * (n * n + n) * f

    def map_leaves():
        alpha = torch.full((3,), 0.01, device=device, requires_grad=True)
        return [rand(width, n * channels, scale=0.02), alpha, initial_bias(n).to(device).requires_grad_()]

    if op in ("mappings", "pre"):
        x = rand(tokens, n, channels, dt=dtype)
        leaves = [x, *map_leaves()]
        if op == "pre":  # x read, u written; backward: x and du read, dx written
            return (lambda kernel: mhc_pre(*leaves, iterations=iterations, eps=1e-5, kernel=kernel), leaves,
                    streams + hidden + small, 2 * streams + hidden + small)
        return (lambda kernel: mhc_mappings(*leaves, iterations=iterations, eps=1e-5, kernel=kernel),
                leaves, streams + maps, 2 * streams + maps)
    if op == "sinkhorn":
        logits = rand(tokens, n, n)
        return (lambda kernel: (sinkhorn(logits, iterations, kernel=kernel),), [logits],
                2 * tokens * n * n * f, 3 * tokens * n * n * f)
    if op in ("expand+pre", "expand_pre"):  # the block input read, u written; backward: it and du read, dx written
        x = rand(tokens, channels, dt=dtype)
        leaves = [x, *map_leaves()]
        kwargs = dict(iterations=iterations, eps=1e-5)
        if op == "expand_pre":
            return (lambda kernel: mhc_expand_pre(*leaves, num_streams=n, kernel=kernel, **kwargs), leaves,
                    2 * hidden + small, 3 * hidden + small)
        return (lambda kernel: mhc_pre(input_expand(x, n, kernel=kernel), *leaves[1:], kernel=kernel, **kwargs),
                leaves, 2 * hidden + small, 3 * hidden + small)
    x, y = rand(tokens, n, channels, dt=dtype), rand(tokens, channels, dt=dtype)
    h_pre = torch.rand(tokens, n, device=device, generator=g).requires_grad_()
    h_post = (2 * torch.rand(tokens, n, device=device, generator=g)).requires_grad_()
    h_res = torch.softmax(torch.randn(tokens, n, n, device=device, generator=g), -1).requires_grad_()
    bias = rand(channels, dt=dtype)
    if op == "aggregate":
        return (lambda kernel: (mhc_aggregate(x, h_pre, kernel=kernel),), [x, h_pre],
                streams + hidden + tokens * n * f, 2 * streams + hidden + 2 * tokens * n * f)
    merge = [x, h_res, h_post, y, bias]
    keys = DropoutKeys(seed=seed, site=1, token_keys=torch.arange(tokens, device=device))
    train = dict(dropout_p=dropout, training=True, dropout_keys=keys)
    key_bytes = tokens * 8 if dropout else 0  # with dropout each direction reads the int64 token keys once
    if op == "merge":
        return (lambda kernel: (mhc_merge(*merge, kernel=kernel, **train),), merge,
                2 * streams + hidden + small + key_bytes, 3 * streams + 2 * hidden + 2 * small + key_bytes)
    if op in ("merge+contract", "merge_contract"):  # x, y read, the mean written; backward: x read, dx written
        fwd, bwd = streams + 2 * hidden + small + key_bytes, 2 * streams + 3 * hidden + 2 * small + key_bytes
        if op == "merge_contract":
            return (lambda kernel: (mhc_merge_contract(*merge, kernel=kernel, **train),), merge, fwd, bwd)
        return (lambda kernel: (output_contract(mhc_merge(*merge, kernel=kernel, **train), kernel=kernel),), merge,
                fwd, bwd)
    # merge_pre, merge+pre: x, y read, x' and u written; backward: x, the gradient of x', y and du read, dx
    # and dy written
    leaves = [*merge, *map_leaves()]
    kwargs = dict(iterations=iterations, eps=1e-5, **train)
    fwd, bwd = 2 * streams + 2 * hidden + 2 * small + key_bytes, 3 * streams + 3 * hidden + 2 * small + key_bytes
    if op == "merge_pre":
        return lambda kernel: mhc_merge_pre(*leaves, kernel=kernel, **kwargs), leaves, fwd, bwd

    def separate(kernel):
        merged = mhc_merge(*merge, kernel=kernel, **train)
        return (merged, *mhc_pre(merged, *leaves[5:], iterations=iterations, eps=1e-5, kernel=kernel))

    return separate, leaves, fwd, bwd


def run_case(op, kernel, tokens, n, channels, dtype, device, args, blocks=None):
    from megatron_gr.ops.triton import mhc_configs

    forward, leaves, fwd_bytes, bwd_bytes = make_case(
        op, tokens, n, channels, dtype, device, dropout=args.dropout, iterations=args.iterations
    )
    with mhc_configs.override(**(blocks or {})):
        outs = forward(kernel)
        grads = [torch.randn_like(o) for o in outs]
        fwd_us = time_us(lambda: forward(kernel), args.warmup, args.reps, device)
        bwd_us = time_us(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), args.warmup, args.reps,
                         device)
    return dict(fwd_us=fwd_us, bwd_us=bwd_us, fwd_gbs=fwd_bytes / fwd_us / 1e3, bwd_gbs=bwd_bytes / bwd_us / 1e3)


def _label(blocks: dict) -> str:
    if not blocks:
        return "default"
    return " ".join(f"{k}={v.label()}" for k, v in blocks.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--channels", default="512,1024,2048")
    parser.add_argument("--tokens", default="16384,65536")
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS), help=f"comma-separated, of {', '.join(OPS)}")
    parser.add_argument("--impls", default="pytorch,triton", help="pytorch (the reference), triton, or both")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--dropout", type=float, default=0.1, help="merge dropout (training mode)")
    parser.add_argument("--iterations", type=int, default=20, help="Sinkhorn-Knopp iterations")
    parser.add_argument("--candidates", action="store_true", help="also time the alternative block sizes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu with triton for a check of the tool)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    n, ops, impls = args.streams, args.ops.split(","), args.impls.split(",")
    unknown = sorted(set(ops) - set(OPS)) + sorted(set(impls) - {"pytorch", "triton"})
    if unknown:
        print(f"unknown op or impl {unknown}: ops are {', '.join(OPS)}; impls pytorch, triton", file=sys.stderr)
        return 2
    from megatron_gr.ops.triton.mhc_configs import CANDIDATES

    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for channels in (int(c) for c in args.channels.split(",")):
            for op in ops:
                case = []
                ref = run_case(op, "pytorch", tokens, n, channels, dtype, device, args) if "pytorch" in impls else None
                if ref is not None:
                    case.append(dict(op=op, tokens=tokens, channels=channels, impl="pytorch", **ref))
                candidates = CANDIDATES.get(op, []) if args.candidates else []
                for blocks in [{}, *candidates] if "triton" in impls else []:
                    fused = run_case(op, "triton", tokens, n, channels, dtype, device, args, blocks)
                    speedups = {} if ref is None else dict(fwd_speedup=ref["fwd_us"] / fused["fwd_us"],
                                                           bwd_speedup=ref["bwd_us"] / fused["bwd_us"])
                    case.append(dict(op=op, tokens=tokens, channels=channels, impl="triton " + _label(blocks), **fused,
                                     **speedups))
                for row in case:
                    print(f"T={tokens} C={channels} {op} {row['impl']}: fwd {row['fwd_us']:.0f} us "
                          f"({row['fwd_gbs']:.0f} GB/s) bwd {row['bwd_us']:.0f} us ({row['bwd_gbs']:.0f} GB/s)",
                          flush=True)
                rows.extend(case)
            for name, parts in SUBLAYERS.items():
                if not all(op in ops for op in parts) or impls != ["pytorch", "triton"]:
                    continue
                for impl in ("pytorch", "triton default"):
                    picked = [r for r in rows if r["tokens"] == tokens and r["channels"] == channels
                              and r["op"] in parts and r["impl"] == impl]
                    rows.append(dict(op=name, tokens=tokens, channels=channels, impl=impl,
                                     fwd_us=sum(r["fwd_us"] for r in picked), bwd_us=sum(r["bwd_us"] for r in picked)))
                ref, fused = rows[-2], rows[-1]
                fused.update(fwd_speedup=ref["fwd_us"] / fused["fwd_us"], bwd_speedup=ref["bwd_us"] / fused["bwd_us"])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter: times meaningless)"
    print(f"\n{name}, n={n}, streams {args.dtype}, merge dropout {args.dropout}, {args.iterations} Sinkhorn "
          f"iterations, torch {torch.__version__}\n")
    print("| op | tokens | C | impl | fwd us | fwd GB/s | bwd us | bwd GB/s | fwd speedup | bwd speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def fmt(row, key, spec):
        return format(row[key], spec) if key in row else ""

    for r in rows:
        print(f"| {r['op']} | {r['tokens']} | {r['channels']} | {r['impl']} | {r['fwd_us']:.0f} | "
              f"{fmt(r, 'fwd_gbs', '.0f')} | {r['bwd_us']:.0f} | {fmt(r, 'bwd_gbs', '.0f')} | "
              f"{fmt(r, 'fwd_speedup', '.2f')} | {fmt(r, 'bwd_speedup', '.2f')} |")
    moved = _pair_bytes(ops, args, n, dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, args=vars(args), rows=rows, pair_bytes=moved),
                                              indent=1))
    return 0


def _pair_bytes(ops, args, n, dtype) -> list:
    """With a merge-pre pair among ``ops``: the bytes its kernels move per sublayer, before
    and after the fusion (analytic, ``mhc_bytes.py``), printed and returned."""
    if not {"merge+pre", "merge_pre"} & set(ops):
        return []
    from mhc_bytes import sublayer_bytes  # beside this script

    print("\nBytes the kernels move per sublayer (analytic, tools/benchmarks/mhc_bytes.py), fwd / bwd MB:")
    moved = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for channels in (int(c) for c in args.channels.split(",")):
            pair = sublayer_bytes(tokens=tokens, streams=n, channels=channels, itemsize=dtype.itemsize)
            moved.append(dict(tokens=tokens, channels=channels, **pair))
            print(f"T={tokens} C={channels}: separate (merge, pre, autograd's add) "
                  f"{pair['before'][0] / 1e6:.0f} / {pair['before'][1] / 1e6:.0f}, fused (merge_pre) "
                  f"{pair['after'][0] / 1e6:.0f} / {pair['after'][1] / 1e6:.0f}")
    return moved


if __name__ == "__main__":
    sys.exit(main())
