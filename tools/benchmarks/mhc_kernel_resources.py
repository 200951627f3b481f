#!/usr/bin/env python3
"""Compiles the fused mHC kernels for an H100 (sm_90a) on any machine, GPU or not, and
prints what each costs on chip: registers per thread, spilled bytes, shared memory and
Hopper ``wgmma`` instructions. Costs no GPU time; use it to prune block sizes before
timing them with ``tools/benchmarks/mhc_ops.py``.

    python tools/benchmarks/mhc_kernel_resources.py [--streams 2,4,8] [--dtypes bf16,fp32]
        [--candidates]

Configurations: the defaults of ``megatron_gr/ops/triton/mhc_configs.py`` (and with
``--candidates`` its ``CANDIDATES``), compiled as the JIT sees a launch on torch
allocations (pointers and sizes divisible by 16). The merge kernels compile with and
without their keyed dropout (``dropout`` in the label): both run in training (the
transformer layers' merges drop, the STU layers' do not), and their register use differs
(Triton lays out the merged tiles differently when the mask's hashes sit between the loads
and the tensor-core product). Needs triton (its wheel ships ptxas).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_gr.ops.triton import mhc_configs  # noqa: E402
from megatron_gr.ops.triton.mhc_aggregate import _aggregate_bwd, _aggregate_fwd  # noqa: E402
from megatron_gr.ops.triton.mhc_mappings import _mappings_bwd_gates, _mappings_bwd_x, _mappings_fwd  # noqa: E402
from megatron_gr.ops.triton.mhc_merge import _merge_bwd, _merge_fwd  # noqa: E402
from megatron_gr.ops.triton.mhc_merge_pre_kernels import merge_bwd_fused, merge_fwd_fused, pre_gates  # noqa: E402
from megatron_gr.ops.triton.mhc_sinkhorn import SEGMENT, _sinkhorn_bwd, _sinkhorn_fwd  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# Pointers in the streams' dtype (every other pointer is float32, the token keys and dropout words int64).
_STREAM_POINTERS = {"X", "DX", "Out", "Grad", "Y", "DY", "Bias", "DU"}
# Matrix operands of the mapping kernels: bf16 halves for bf16 streams, else float32.
_OPERAND_POINTERS = {"PHi", "PLo", "P", "GHi", "GLo"}
_FLOAT_SCALARS = {"eps", "p"}
_INT_SCALARS = {"K", "C"}  # sizes with upper-case names
# Scalars the kernels do not specialise on (the token count, the keyed-dropout words, the
# Sinkhorn iterations).
_UNSPECIALIZED = {"num_tokens", "feature_offset", "s0", "s1", "s2", "threshold", "iterations"}


def compile_report(fn, constexprs: dict, cfg: mhc_configs.Blocks, stream_dtype: str, *, operands: str = "fp32") -> str:
    signature, attrs = {}, {}
    streams_in_place = fn.__name__.startswith(
        ("_aggregate", "_merge", "_mappings_fwd", "_mappings_bwd_x", "pre_gates", "merge_"))
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
        elif name[0].isupper() and name not in _INT_SCALARS:
            if name in ("Keys", "Words"):
                signature[name] = "*i64"
            elif name in _OPERAND_POINTERS:
                signature[name] = f"*{operands}"
            elif streams_in_place and name in _STREAM_POINTERS:
                signature[name] = f"*{stream_dtype}"
            else:
                signature[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in _UNSPECIALIZED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {key: value for key, value in cfg.launch().items() if value is not None}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", handle.name, "-o", os.devnull], capture_output=True,
                            text=True).stderr
    os.unlink(handle.name)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    return (f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}B "
            f"smem={kernel.metadata.shared // 1024}KiB wgmma={ptx.count('wgmma.mma_async')} "
            f"mma.sync={ptx.count('mma.sync.aligned')}")


def kernels(n: int, dtype: torch.dtype):
    """``(name, kernel, constexprs, blocks, mapping operand dtype)`` of every launch at
    ``n`` streams with the current configuration."""
    padded, width = triton.next_power_of_2(n), n * n + 2 * n
    wp, split = max(16, triton.next_power_of_2(width)), dtype == torch.bfloat16
    fwd = mhc_configs.blocks("mappings_fwd", streams=n, dtype=dtype)
    bwd = mhc_configs.blocks("mappings_bwd", streams=n, dtype=dtype)
    operands = "bf16" if split else "fp32"
    yield ("mappings fwd", _mappings_fwd, dict(n=n, W=width, WP=wp, BLOCK_T=fwd.block_t, BLOCK_K=fwd.block_c,
                                                 SPLIT=split, UPCAST=False), fwd, operands)
    gates = mhc_configs.Blocks(mhc_configs.gate_block_tokens(n), 16, 4)
    yield ("mappings bwd gates", _mappings_bwd_gates, dict(n=n, W=width, WP=wp, BLOCK_T=gates.block_t, SPLIT=split),
           gates, operands)
    for aggregate in (False, True):  # True: the pre op's projection backward, with the aggregate's dx term
        yield (f"{'pre' if aggregate else 'mappings'} bwd x", _mappings_bwd_x,
               dict(n=n, W=width, WP=wp, BLOCK_T=bwd.block_t, BLOCK_K=bwd.block_c, SPLIT=split, UPCAST=False,
                    AGGREGATE=aggregate, WHOLE_CHUNKS=True), bwd, operands)
    pre_cfg = mhc_configs.blocks("pre_bwd_gates", streams=n, dtype=dtype)
    gate_consts = dict(n=n, W=width, WP=wp, BLOCK_T=pre_cfg.block_t, BLOCK_C=pre_cfg.block_c, HAS_BIAS=False,
                       DROPOUT=False, DEVICE_WORDS=False, SPLIT=split)
    yield ("pre bwd gates", pre_gates, dict(gate_consts, S=n, MERGE=False), pre_cfg, operands)
    yield ("expand pre bwd gates", pre_gates, dict(gate_consts, S=1, MERGE=False), pre_cfg, operands)
    # the fused merge pairs (merge + next pre; the block's last merge + contraction), S = n
    # streams and S = 1 (the block input standing for n copies), without and with dropout
    for stored, dropout in ((n, False), (n, True), (1, False), (1, True)):
        label = ("" if stored == n else " (expand)") + (" dropout" if dropout else "")
        cfg = mhc_configs.blocks("merge_pre_fwd", streams=n, dtype=dtype)
        merge = dict(n=n, S=stored, HAS_BIAS=True, DROPOUT=dropout, DEVICE_WORDS=False, SPLIT=split, UPCAST=False)
        yield ("merge pre fwd" + label, merge_fwd_fused, dict(merge, W=width, WP=wp, BLOCK_T=cfg.block_t,
               BLOCK_C=cfg.block_c, MAPS=True, CONTRACT=False), cfg, operands)
        cfg = mhc_configs.blocks("merge_pre_bwd_gates", streams=n, dtype=dtype)
        yield ("merge pre bwd gates" + label, pre_gates, dict(gate_consts, S=stored, MERGE=True, HAS_BIAS=True,
               DROPOUT=dropout, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c), cfg, operands)
        cfg = mhc_configs.blocks("merge_pre_bwd", streams=n, dtype=dtype)
        yield ("merge pre bwd" + label, merge_bwd_fused, dict(merge, MP=triton.next_power_of_2(n * n + n), W=width,
               WP=wp, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PRE=True, CONTRACT=False, HAS_GRAD=True), cfg,
               operands)
        cfg = mhc_configs.blocks("merge_contract_fwd", streams=n, dtype=dtype)
        yield ("merge contract fwd" + label, merge_fwd_fused, dict(merge, W=1, WP=16, BLOCK_T=cfg.block_t,
               BLOCK_C=cfg.block_c, MAPS=False, CONTRACT=True, SPLIT=False), cfg, "fp32")
        cfg = mhc_configs.blocks("merge_contract_bwd", streams=n, dtype=dtype)
        yield ("merge contract bwd" + label, merge_bwd_fused, dict(merge, MP=triton.next_power_of_2(n * n + n), W=1,
               WP=16, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PRE=False, CONTRACT=True, HAS_GRAD=True,
               SPLIT=False), cfg, "fp32")
    for backward in (False, True):
        block = mhc_configs.sinkhorn_block_tokens(n, backward=backward)
        consts = dict(n=n, N=padded, BLOCK_T=block, **({"SEGMENT": SEGMENT} if backward else {}))
        yield (f"sinkhorn {'bwd' if backward else 'fwd'}", _sinkhorn_bwd if backward else _sinkhorn_fwd, consts,
               mhc_configs.Blocks(block, 16, 4), "fp32")
    for op, fn in (("aggregate_fwd", _aggregate_fwd), ("aggregate_bwd", _aggregate_bwd)):
        cfg = mhc_configs.blocks(op, streams=n, dtype=dtype)
        consts = dict(n=n, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, **({"NP": padded} if op == "aggregate_bwd" else {}))
        yield (op.replace("_", " "), fn, consts, cfg, "fp32")
    for op, fn in (("merge_fwd", _merge_fwd), ("merge_bwd", _merge_bwd)):
        cfg = mhc_configs.blocks(op, streams=n, dtype=dtype)
        for dropout in (False, True):
            consts = dict(n=n, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, HAS_BIAS=True, DROPOUT=dropout,
                          DEVICE_WORDS=False)
            if op == "merge_bwd":
                consts["MP"] = triton.next_power_of_2(n * n + n)
            yield (op.replace("_", " ") + (" dropout" if dropout else ""), fn, consts, cfg, "fp32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="2,4,8")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--candidates", action="store_true", help="also the alternatives of CANDIDATES")
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    settings = [("default", {})]
    if args.candidates:
        settings += [(" ".join(f"{k}={v.label()}" for k, v in c.items()), c)
                     for group in mhc_configs.CANDIDATES.values() for c in group]
    for label, overrides in settings:
        print(f"-- {label}")
        for name in args.dtypes.split(","):
            for n in (int(s) for s in args.streams.split(",")):
                with mhc_configs.override(**overrides):
                    for kernel_name, fn, consts, cfg, operands in kernels(n, dtypes[name]):
                        if overrides and not any(kernel_name.startswith(k.split("_")[0]) for k in overrides):
                            continue
                        report = compile_report(fn, consts, cfg, name, operands=operands)
                        launch = f"warps={cfg.num_warps} stages={cfg.num_stages}" + (
                            f" maxnreg={cfg.maxnreg}" if cfg.maxnreg else "")
                        print(f"n={n} {name} {kernel_name:36s} {cfg.block_t}x{cfg.block_c} {launch}: "
                              f"{report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
