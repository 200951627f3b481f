#!/usr/bin/env python3
"""Compiles the HSTU attention kernels for an H100 (sm_90a) on any machine, GPU or not, and
prints what each configuration costs on chip: registers per thread, spilled bytes, shared
memory, how many programs fit on one SM at once, and whether the matrix products became Hopper ``wgmma`` instructions. Costs no GPU
time; use it to prune configurations before timing them.

    python tools/benchmarks/hstu_kernel_resources.py [--dims 256,128,64] [--dtype bf16]
        [--variants fused,split] [--sharded] [--dump-ptx DIR]

Configurations: the per-head-dim tables of ``megatron_gr/ops/triton/hstu_configs.py``
(causal mask, no bias; ``--heaviest``: every mask rule and the bias, which need more shared
memory: check new table entries this way), one block of backward kernels per variant. ``wgmma`` counts the
instructions in the code, not their executions. ``--sharded``: the context-parallel variant
(query segments against their own keys). ``--dump-ptx DIR``: each kernel's PTX code without
its parameter list, line and debug information, so that two commits can be diffed (the
context-parallel change left the code of the default variant identical). Needs triton (its
wheel ships ptxas).
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
from megatron_gr.ops.triton.hstu_configs import _FORWARD, backward_config, override  # noqa: E402


PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
_INT64_POINTERS = {"Offsets", "NumTargets", "Timestamps", "KeyOffsets", "QueryStart", "SeqLengths", "KeyTimestamps"}
_FP32_POINTERS = {"PosW", "TimeW", "DPosW", "DTimeW"}


def compile_report(fn, constexprs: dict, num_warps: int, num_stages: int, dtype: str, maxnreg=None, dump=None) -> str:
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
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}  # older kernels
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    ptx = kernel.asm["ptx"]
    if dump is not None:
        dump.write_text(code_of(ptx))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", handle.name, "-o", os.devnull], capture_output=True, text=True).stderr
    os.unlink(handle.name)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    per_sm = "?"
    if regs:
        # H100: 65,536 registers (allocated per warp in units of 256), 228 KiB of shared
        # memory per SM of which each program reserves 1 KiB, at most 64 warps.
        by_regs = 65536 // (-(-int(regs.group(1)) * 32 // 256) * 256 * num_warps)
        by_smem = (228 * 1024) // (kernel.metadata.shared + 1024)
        per_sm = min(by_regs, by_smem, 64 // num_warps)
        if kernel.metadata.shared > 227 * 1024:
            per_sm = "0 (over the 227 KiB a program may use: fails to launch)"
    return (f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}B "
            f"smem={kernel.metadata.shared // 1024}KiB programs/SM={per_sm} wgmma={ptx.count('wgmma.mma_async')}")


def code_of(ptx: str) -> str:
    """The instructions of a PTX module: no parameter declarations (their number changes
    with the signature), line markers, comments or debug sections."""
    code = ptx.split(".section\t.debug")[0].split(".section .debug")[0]
    keep = [re.sub(r"\s*//.*$", "", line) for line in code.splitlines()]
    return "\n".join(line for line in keep if line.strip() and not re.match(r"\s*\.(param|loc|file)\b", line)) + "\n"


def backward_runs(label: str, bwd) -> list:
    """(name, kernel, config, extra constexprs) of each backward kernel launched for ``bwd``."""
    key = dict(ATOMIC_DQ=bwd.atomic_dq, NUM_SLOTS=1)
    if bwd.split_dkdv:
        runs = [(f"{label} dv", hstu_bwd_dkdv_kernel, bwd, dict(key, WITH_DK=False, WITH_DV=True)),
                (f"{label} dk", hstu_bwd_dkdv_kernel, bwd.dk or bwd, dict(key, WITH_DK=True, WITH_DV=False))]
    else:
        runs = [(f"{label} dk/dv", hstu_bwd_dkdv_kernel, bwd, dict(key, WITH_DK=True, WITH_DV=True))]
    if not bwd.atomic_dq:
        runs.append((f"{label} dq", hstu_bwd_dq_kernel, bwd.dq or bwd, {}))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="256,128,64")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--variants", default="fused,split", help="backward variants to compile")
    parser.add_argument("--candidates", action="store_true",
                        help="compile the --sweep candidates of hstu_attention.py instead of the default tables")
    parser.add_argument("--heaviest", action="store_true",
                        help="every mask rule and the relative bias on (the most shared memory and registers) "
                             "instead of the causal mask alone")
    parser.add_argument("--bias", action="store_true", help="the causal mask with the relative bias (the e2e shape)")
    parser.add_argument("--per-pair-bias", action="store_true",
                        help="the bias without its uniform-tile path (hstu_configs.uniform_bias_tiles)")
    parser.add_argument("--sharded", action="store_true", help="the context-parallel variant of every kernel")
    parser.add_argument("--dump-ptx", type=Path, help="write each kernel's PTX code (see above) into this directory")
    args = parser.parse_args()
    heavy = args.heaviest or args.bias
    if args.dump_ptx:
        args.dump_ptx.mkdir(parents=True, exist_ok=True)
    for d in (int(x) for x in args.dims.split(",")):
        masks = args.heaviest
        flags = dict(DQK=d, DV=d, BLOCK_DQK=d, BLOCK_DV=d, CAUSAL=True, HAS_TARGETS=masks, HAS_CONTEXT=masks,
                     HAS_WINDOW=masks, HAS_PREFIX=masks, HAS_BIAS=heavy, TIME_FN=0, NORM_BY_LEN=False,
                     FAST_SILU=True, ASM_GATHER=True, PRECISION="tf32", UNIFORM_BIAS=heavy and not args.per_pair_bias,
                     SHARDED=args.sharded)
        if args.candidates:
            from hstu_attention import SWEEP  # the benchmark beside this file

            runs = [("forward", hstu_fwd_kernel, cfg, {}) for cfg in SWEEP[d]["forward"]]
            for variant in args.variants.split(","):
                for i, bwd in enumerate(SWEEP[d][variant]):
                    runs += backward_runs(f"{variant}#{i}", bwd)
        else:
            runs = [("forward", hstu_fwd_kernel, _FORWARD[d], {})]
            for variant in args.variants.split(","):
                with override(backward_variant=variant):
                    runs += backward_runs(variant, backward_config(d, d, torch.bfloat16, has_bias=heavy))
        for name, fn, cfg, extra in runs:
            consts = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **extra)
            if "NUM_SLOTS" in consts and heavy:
                consts["NUM_SLOTS"] = 64  # as hstu_attention.py launches with a bias
            dump = None
            if args.dump_ptx:
                dump = args.dump_ptx / f"D{d}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}_{cfg.block_m}x{cfg.block_n}.ptx"
            report = compile_report(fn, consts, cfg.num_warps, cfg.num_stages, args.dtype, cfg.maxnreg, dump)
            print(f"D={d} {name:11s} {cfg.block_m}x{cfg.block_n} warps={cfg.num_warps} stages={cfg.num_stages} "
                  f"maxnreg={cfg.maxnreg}: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
