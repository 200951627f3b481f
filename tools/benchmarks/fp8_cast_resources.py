#!/usr/bin/env python3
"""Compiles the fused FP8 cast kernel for an H100 (sm_90a) on any machine, GPU or not, for
every format, scale layout and output combination it launches with, and prints its
registers, spilled bytes and the FP8 conversion instructions in its PTX (none: the kernel
writes the FP8 bytes with integer operations, see the kernel's module docstring). Costs no GPU time; the CPU
tests run the kernel in Triton's interpreter, which cannot see GPU compile errors.

    python tools/benchmarks/fp8_cast_resources.py
"""

from __future__ import annotations

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

from megatron_gr.ops.triton import fp8_cast  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_report(dtype: torch.dtype, scale_axis, *, out: bool, transposed: bool, amax: bool) -> str:
    fn = fp8_cast._fp8_cast_kernel
    constexprs = fp8_cast.kernel_constants(dtype, scale_axis, out=out, transposed=transposed, amax=amax)
    pointers = {"X": "*bf16", "S": "*fp32", "OUT": "*u8", "OUT_T": "*u8", "AMAX": "*fp32"}  # FP8 codes as bytes
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    constants = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=fp8_cast.NUM_WARPS))
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", handle.name, "-o", os.devnull], capture_output=True,
                            text=True).stderr
    os.unlink(handle.name)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    return (f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}B "
            f"fp8_cvt={ptx.count('cvt.rn.satfinite.e')} atomics={ptx.count('atom.global')}")


def main() -> int:
    launches = [  # (scale axis, out, transposed, amax): the launches of megatron_gr/transformer/fp8/scaling.py
        (None, True, False, False), (None, True, True, False), (None, False, True, True), (None, True, True, True),
        (0, True, False, False), (1, False, True, False),
    ]
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for axis, out, transposed, amax in launches:
            label = f"{str(dtype).split('.')[-1]} scale_axis={axis} out={out} transposed={transposed} amax={amax}"
            print(f"{label}: {compile_report(dtype, axis, out=out, transposed=transposed, amax=amax)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
