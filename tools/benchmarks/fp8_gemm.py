#!/usr/bin/env python3
"""FP8 against bf16 at the GEMM level on a GPU: device time (CUDA events, warm-up, median
of repetitions) and TFLOP/s of

- ``gemm``: one forward GEMM ``[T, H] x [H, N]`` alone: ``torch.mm`` in bf16 against
  ``torch._scaled_mm`` on operands already in FP8 (per-tensor and row-wise scales);
- ``linear``: a whole linear, forward and backward (3 GEMMs, 6 T H N FLOPs): bf16
  ``F.linear`` against :func:`megatron_gr.transformer.fp8.fp8_linear` per recipe, casts,
  amaxes and transposes included (the weight cast counted once per call, as in the first
  micro-batch of a step).

N is 4H (the STU UVQK projection with 4 heads of H/4: 2 dv + 2 dqk = 4H) or H (its output
projection). Prints markdown rows; ``--json`` writes them too.

    python tools/benchmarks/fp8_gemm.py [--hidden 1024 2048 4096] [--tokens 16384 32768 65536]
        [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def device_time_ms(fn, *, warmup: int, reps: int) -> float:
    """Median device time of ``fn`` in milliseconds (one pair of CUDA events per call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_rows(tokens: int, hidden: int, out: int, *, warmup: int, reps: int) -> list[dict]:
    from megatron_gr.transformer.fp8.linear import scaled_matmul
    from megatron_gr.transformer.fp8.scaling import quantize_per_row, quantize_per_tensor

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
    flops = 2 * tokens * hidden * out
    rows = []
    bf16_ms = device_time_ms(lambda: torch.mm(x, w.t()), warmup=warmup, reps=reps)
    rows.append(_row("gemm", "bf16", tokens, hidden, out, bf16_ms, flops, bf16_ms))
    common = dict(margin=0, group=None, kernel="triton")
    per_tensor = [quantize_per_tensor(t, dtype=torch.float8_e4m3fn, **common)[0] for t in (x, w)]
    per_row = [quantize_per_row(t, dtype=torch.float8_e4m3fn, **common) for t in (x, w)]
    for name, (a, b) in (("fp8 tensorwise", per_tensor), ("fp8 rowwise", per_row)):
        ms = device_time_ms(
            lambda: scaled_matmul(a, b, out_dtype=torch.bfloat16, fast_accum=True), warmup=warmup, reps=reps
        )
        rows.append(_row("gemm", name, tokens, hidden, out, ms, flops, bf16_ms))
    return rows


def linear_rows(tokens: int, hidden: int, out: int, *, warmup: int, reps: int) -> list[dict]:
    from megatron_gr.transformer.fp8 import Fp8LinearState, Fp8Recipe, fp8_linear

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(out, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5).requires_grad_()
    b = torch.zeros(out, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16) * 1e-3
    flops = 6 * tokens * hidden * out

    def bf16_step():
        torch.nn.functional.linear(x, w, b).backward(grad)

    rows = []
    bf16_ms = device_time_ms(bf16_step, warmup=warmup, reps=reps)
    rows.append(_row("linear fwd+bwd", "bf16", tokens, hidden, out, bf16_ms, flops, bf16_ms))
    for recipe in ("tensorwise", "delayed", "rowwise"):
        state = Fp8LinearState(Fp8Recipe(format="hybrid", recipe=recipe, amax_history_len=16 if recipe == "delayed" else 1,
                                         amax_compute_algo="max" if recipe == "delayed" else "most_recent"))

        def fp8_step():
            fp8_linear(x, w, b, state=state).backward(grad)

        ms = device_time_ms(fp8_step, warmup=warmup, reps=reps)
        rows.append(_row("linear fwd+bwd", f"fp8 {recipe} (hybrid)", tokens, hidden, out, ms, flops, bf16_ms))
    return rows


def _row(what, variant, tokens, hidden, out, ms, flops, bf16_ms) -> dict:
    return {"what": what, "variant": variant, "tokens": tokens, "hidden": hidden, "out": out, "ms": ms,
            "tflops": flops / ms / 1e9, "speedup": bf16_ms / ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU with FP8 tensor cores", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device time, median of {args.reps}")
    print("| what | variant | tokens | hidden | N | ms | TFLOP/s | speedup vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            for out in (4 * hidden, hidden):
                for row in gemm_rows(tokens, hidden, out, warmup=args.warmup, reps=args.reps) + linear_rows(
                    tokens, hidden, out, warmup=args.warmup, reps=args.reps
                ):
                    rows.append(row)
                    print(f"| {row['what']} | {row['variant']} | {tokens} | {hidden} | {out} | {row['ms']:.3f} | "
                          f"{row['tflops']:.0f} | {row['speedup']:.2f} |", flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
