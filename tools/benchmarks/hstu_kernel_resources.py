#!/usr/bin/env python3
"""Compiles the HSTU attention kernels for an H100 (sm_90a) on any machine, GPU or not, and
prints what each configuration costs on chip: registers per thread, spilled bytes, shared
memory, and whether the matrix products became Hopper ``wgmma`` instructions. Costs no GPU
time; use it to prune configurations before timing them.

    python tools/benchmarks/hstu_kernel_resources.py [--dims 256,128,64] [--dtype bf16] [--bias]

Configurations: the defaults of ``megatron_gr/ops/triton/hstu_configs.py`` (causal mask;
``--bias``: with the relative position + time bias, and the blocks chosen for it). An H100
gives a program at most 227 KiB of shared memory. Needs triton (its wheel ships ptxas).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_gr.ops.triton.hstu_attention_bwd import hstu_bwd_dkdv_kernel, hstu_bwd_dq_kernel  # noqa: E402
from megatron_gr.ops.triton.hstu_attention_fwd import hstu_fwd_kernel  # noqa: E402
from megatron_gr.ops.triton.hstu_attention import _BIAS_GRAD_SLOTS  # noqa: E402
from megatron_gr.ops.triton.hstu_configs import _FORWARD, backward_config  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
_INT64_POINTERS = {"Offsets", "NumTargets", "Timestamps"}
_FP32_POINTERS = {"PosW", "TimeW", "DPosW", "DTimeW"}


def compile_report(fn, constexprs: dict, num_warps: int, num_stages: int, dtype: str) -> str:
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            continue
        if name[0].isupper():  # tensors
            signature[name] = "*i64" if name in _INT64_POINTERS else "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT sees for torch allocations
        elif name in ("alpha", "inv_max_seq_len"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", handle.name, "-o", os.devnull], capture_output=True, text=True).stderr
    os.unlink(handle.name)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    return (f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}B "
            f"smem={kernel.metadata.shared // 1024}KiB wgmma={ptx.count('wgmma.mma_async')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="256,128,64")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--bias", action="store_true", help="with the relative attention bias")
    args = parser.parse_args()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for d in (int(x) for x in args.dims.split(",")):
        flags = dict(DQK=d, DV=d, BLOCK_DQK=d, BLOCK_DV=d, CAUSAL=True, HAS_TARGETS=False, HAS_CONTEXT=False,
                     HAS_WINDOW=False, HAS_PREFIX=False, HAS_BIAS=args.bias, TIME_FN=0, NORM_BY_LEN=False,
                     FAST_SILU=True, PRECISION="tf32")
        fwd, bwd = _FORWARD[d], backward_config(d, d, torch_dtype, has_bias=args.bias)
        dq = bwd.dq or bwd
        runs = [
            ("forward", hstu_fwd_kernel, fwd, {}),
            ("dk/dv", hstu_bwd_dkdv_kernel, bwd, dict(ATOMIC_DQ=bwd.atomic_dq, NUM_SLOTS=_BIAS_GRAD_SLOTS if args.bias else 1)),
        ]
        if not bwd.atomic_dq:
            runs.append(("dq", hstu_bwd_dq_kernel, dq, {}))
        for name, fn, cfg, extra in runs:
            consts = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **extra)
            report = compile_report(fn, consts, cfg.num_warps, cfg.num_stages, args.dtype)
            print(f"D={d} {name:8s} {cfg.block_m}x{cfg.block_n} warps={cfg.num_warps} stages={cfg.num_stages}: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
