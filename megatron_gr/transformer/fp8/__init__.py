"""FP8 linears without Transformer Engine: megatron's column- and row-parallel linears
whose GEMMs run on ``torch._scaled_mm`` (e4m3 forward, e5m2 or e4m3 gradients), with
delayed, per-tensor current or row-wise scaling, amaxes reduced over the tensor-parallel
group; and the choice between them and Transformer Engine's.

    recipe.py           Fp8Recipe: the settings, from megatron's FP8 config fields
    scaling.py          amaxes, scales, the amax history, quantised operands
    linear.py           the autograd function over torch._scaled_mm, per-linear state
    parallel_linear.py  Fp8ColumnParallelLinear, Fp8RowParallelLinear
    graph_capture.py    what CUDA graphs of FP8 layers need: captured code paths, state kept
    backend.py          which linears a config gets; can FP8 run on this device
"""

from megatron_gr.transformer.fp8.backend import (
    check_fp8_runnable,
    fp8_backend_for,
    parallel_linear_classes,
)
from megatron_gr.transformer.fp8.linear import Fp8LinearState, fp8_linear
from megatron_gr.transformer.fp8.recipe import Fp8Recipe
from megatron_gr.transformer.fp8.scaling import AmaxHistory

__all__ = [
    "AmaxHistory",
    "Fp8LinearState",
    "Fp8Recipe",
    "check_fp8_runnable",
    "fp8_backend_for",
    "fp8_linear",
    "parallel_linear_classes",
]
