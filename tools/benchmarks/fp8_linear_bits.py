#!/usr/bin/env python3
"""Bit-level parity of the FP8 linears between two checkouts: dump every recipe's outputs,
gradients and amax histories on adversarial inputs (zeros, inf, NaN, huge, subnormal, 3-d
inputs, token counts that need padding, a missing bias, an input without a gradient), then
compare two dumps byte for byte (NaN payloads included).

    PYTHONPATH=<checkout A> python tools/benchmarks/fp8_linear_bits.py dump a.pt [--device cuda --kernel triton]
    PYTHONPATH=<checkout B> python tools/benchmarks/fp8_linear_bits.py dump b.pt [--device cuda --kernel triton]
    python tools/benchmarks/fp8_linear_bits.py compare a.pt b.pt      # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import sys

import torch

STEPS = ["normal", "zeros", "normal", "inf", "huge", "nan", "tiny", "normal", "normal"]


def _input(kind: str, generator: torch.Generator, shape) -> torch.Tensor:
    x = torch.randn(*shape, generator=generator)
    if kind == "zeros":
        x.zero_()
    elif kind == "inf":
        x.view(-1)[3] = float("inf")
    elif kind == "nan":
        x.view(-1)[5] = float("nan")
    elif kind == "huge":
        x *= 1e36
    elif kind == "tiny":
        x *= 1e-42
    return x


def dump(path: str, *, device: str, kernel: str) -> None:
    from megatron_gr.transformer.fp8.linear import Fp8LinearState, fp8_linear
    from megatron_gr.transformer.fp8.recipe import Fp8Recipe

    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    out = {}
    for fmt in ("hybrid", "e4m3"):
        for name in ("tensorwise", "delayed", "rowwise"):
            for wgrad in (True, False):
                for dtype in dtypes:
                    generator = torch.Generator().manual_seed(1)
                    recipe = Fp8Recipe(format=fmt, recipe=name, amax_history_len=3,
                                       amax_compute_algo="max" if wgrad else "most_recent", wgrad=wgrad)
                    state = Fp8LinearState(recipe, kernel=kernel)
                    weight = torch.randn(32, 48, generator=generator).to(device, dtype).requires_grad_()
                    bias = torch.randn(32, generator=generator).to(device, dtype).requires_grad_()
                    for step, kind in enumerate(STEPS):
                        shape = (2, 10, 48) if step % 2 else (20, 48)
                        x = _input(kind, generator, shape).to(device, dtype).requires_grad_(step != 2)
                        y = fp8_linear(x, weight, bias if step != 4 else None, state=state)
                        y.backward(_input("huge" if kind == "tiny" else "normal", generator, y.shape).to(device, dtype))
                        key = f"{fmt}/{name}/wgrad={wgrad}/{dtype}/{step}"
                        out[f"{key}/y"], out[f"{key}/dx"] = y.detach().cpu(), x.grad
                        out[f"{key}/dw"], out[f"{key}/db"] = weight.grad, bias.grad
                        weight.grad = bias.grad = None
                        for which in ("input_history", "grad_history"):
                            history = getattr(state, which)
                            if history is not None:
                                # copies: the history is updated in place
                                out[f"{key}/{which}"] = history.history.clone()
                                out[f"{key}/{which}/scale"] = history.scale.clone()
    torch.save({k: None if v is None else v.detach().cpu().clone() for k, v in out.items()}, path)
    print(f"{len(out)} tensors -> {path}")


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _same(x, y) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(_raw(x), _raw(y))


def compare(path_a: str, path_b: str) -> int:
    a, b = torch.load(path_a), torch.load(path_b)
    if a.keys() != b.keys():
        print(f"different entries: {sorted(set(a) ^ set(b))[:10]}")
        return 1
    different = [key for key in a if not _same(a[key], b[key])]
    for key in different[:20]:
        print(f"differs: {key}")
    print(f"{len(a)} tensors compared, {len(different)} differ")
    return 1 if different else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dumping = sub.add_parser("dump")
    dumping.add_argument("path")
    dumping.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    dumping.add_argument("--kernel", default="pytorch", choices=("pytorch", "triton"))
    comparing = sub.add_parser("compare")
    comparing.add_argument("a")
    comparing.add_argument("b")
    args = parser.parse_args(argv)
    if args.command == "dump":
        dump(args.path, device=args.device, kernel=args.kernel)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
