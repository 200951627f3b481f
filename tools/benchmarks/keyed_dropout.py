#!/usr/bin/env python3
"""What the keyed dropout mask costs on the GPU: the fused STU output (``dropout(LayerNorm(A)
* U)``), the mHC merge and the standalone keyed dropout, each with dropout off and on,
forward and backward, and the standalone kernel against ``torch.nn.functional.dropout``.
The Triton kernels hash the mask from the token keys (no mask in memory), so the ``on``
rows should cost about what the ``off`` rows do. Prints a markdown table (JSON with
``--json``).

    python tools/benchmarks/keyed_dropout.py [--tokens 65536] [--width 256,1024]
        [--streams 4] [--dropout 0.1] [--json FILE]

Timing: CUDA events around each call after ``--warmup`` calls, median of ``--reps``; the
forward runs with autograd on (as in training), the backward alone through
``torch.autograd.grad`` on a retained graph. ``--device cpu`` runs the kernels in Triton's
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


def cases(tokens: int, width: int, streams: int, p: float, device: torch.device):
    """``(op, implementation, forward() -> output, leaves)`` for every row of the table."""
    import torch.nn.functional as F

    from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout
    from megatron_gr.ops.mhc import mhc_merge
    from megatron_gr.ops.stu_output import stu_output

    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_()

    keys = DropoutKeys(seed=1234, site=5, token_keys=torch.arange(tokens, device=device))
    heads = max(1, width // 128)
    attn, u = rand(tokens, heads, width // heads), rand(tokens, heads, width // heads)
    weight, bias = rand(width, dtype=torch.float32), rand(width, dtype=torch.float32)
    for label, q in (("off", 0.0), ("on", p)):
        yield ("stu output", f"triton, dropout {label}", lambda q=q: stu_output(
            attn, u, weight, bias, eps=1e-5, dropout_p=q, training=True, dropout_keys=keys, kernel="triton"),
            [attn, u, weight, bias])
    x, y = rand(tokens, streams, width), rand(tokens, width)
    h_post = (2 * torch.rand(tokens, streams, device=device, generator=g)).requires_grad_()
    h_res = torch.softmax(torch.randn(tokens, streams, streams, device=device, generator=g), -1).requires_grad_()
    merge_bias = rand(width)
    for label, q in (("off", 0.0), ("on", p)):
        yield (f"mhc merge n={streams}", f"triton, dropout {label}", lambda q=q: mhc_merge(
            x, h_res, h_post, y, merge_bias, dropout_p=q, training=True, dropout_keys=keys, kernel="triton"),
            [x, h_res, h_post, y, merge_bias])
    z = rand(tokens, width)
    yield ("dropout", "torch F.dropout", lambda: F.dropout(z, p=p, training=True), [z])
    yield ("dropout", "keyed, pytorch", lambda: keyed_dropout(z, keys, p=p, training=True, kernel="pytorch"), [z])
    yield ("dropout", "keyed, triton", lambda: keyed_dropout(z, keys, p=p, training=True, kernel="triton"), [z])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--width", default="256,1024", help="features per token (heads x dv; merge channels)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = []
    for width in (int(w) for w in args.width.split(",")):
        for op, impl, forward, leaves in cases(args.tokens, width, args.streams, args.dropout, device):
            out = forward()
            grad = torch.randn_like(out)
            fwd = time_us(forward, args.warmup, args.reps, device)
            bwd = time_us(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), args.warmup, args.reps,
                          device)
            rows.append(dict(op=op, width=width, tokens=args.tokens, impl=impl, fwd_us=fwd, bwd_us=bwd))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"\n{name}, bf16, {args.tokens} tokens, dropout p={args.dropout}\n")
    print("| op | width | implementation | fwd us | bwd us |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['width']} | {r['impl']} | {r['fwd_us']:.1f} | {r['bwd_us']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "dropout": args.dropout, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
