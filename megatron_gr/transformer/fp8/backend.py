"""Which FP8 linears a model gets, and whether FP8 can run on the run's device.

FP8 is never a silent no-op: a config that asks for it builds FP8 linears, and a device
that cannot run them (the CPU, a GPU without FP8 tensor cores, a ``torch._scaled_mm``
that rejects the recipe's operands) is a ``ConfigError`` before the model is built.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_gr.compat import transformer_engine_available
from megatron_gr.config.errors import ConfigError
from megatron_gr.config.fp8_validation import recipe_name
from megatron_gr.transformer.fp8.recipe import FP8_GEMM_ALIGNMENT, Fp8Recipe

FP8_BACKENDS = ("native", "te")
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
MIN_COMPUTE_CAPABILITY = (8, 9)


def fp8_backend_for(config) -> Optional[str]:
    """None without ``config.fp8``; ``te`` when Transformer Engine is installed (its linears
    under megatron's FP8 recipes); else ``native`` (this package's linears)."""
    if config.fp8 is None:
        return None
    return "te" if transformer_engine_available() else "native"


def parallel_linear_classes(backend: Optional[str]) -> tuple[type, type]:
    """``(column-parallel, row-parallel)`` linear classes of ``backend`` (None: megatron's
    local linears)."""
    if backend is None:
        return ColumnParallelLinear, RowParallelLinear
    if backend == "native":
        from megatron_gr.transformer.fp8.parallel_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear

        return Fp8ColumnParallelLinear, Fp8RowParallelLinear
    if backend == "te":
        # Transformer Engine's linears; megatron's block enters its FP8 autocast (config.fp8).
        # Not run here (TE does not install on these machines); TE's FP8 GEMMs may ask for
        # token counts that are multiples of 8 or 16, which jagged batches do not promise.
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return TEColumnParallelLinear, TERowParallelLinear
    raise ValueError(f"fp8 backend {backend!r}: choose None or one of {FP8_BACKENDS}")


def check_fp8_runnable(config, device: torch.device) -> None:
    """Raises ``ConfigError`` (one line) when the model config asks for FP8 and it cannot
    run on ``device`` with the run's precision and the STU layer sizes; nothing otherwise."""
    if config.fp8 is None:
        return
    reason = fp8_unavailable_reason(config, device)
    if reason is not None:
        raise ConfigError(
            f"model.fp8={config.fp8!r} (fp8_recipe={recipe_name(config)!r}) cannot run here: {reason}; "
            "unset model.fp8 to train in bf16"
        )


def fp8_unavailable_reason(config, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return (
            f"FP8 GEMMs need a CUDA GPU with FP8 tensor cores (compute capability >= 8.9) and this run is on "
            f"the {device.type.upper()}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; FP8 "
            "tensor cores need >= 8.9 (Ada, Hopper or later)"
        )
    if not config.bf16:
        return "FP8 linears train with bf16 activations and parameters: use training.precision=bf16 (or auto on a GPU)"
    shape = stu_shape_problem(config)
    if shape is not None:
        return shape
    if fp8_backend_for(config) == "te":
        return None
    if importlib.util.find_spec("triton") is None:
        return "the native FP8 linears cast with Triton kernels on a GPU, and triton is not installed (pip install 'megatron_gr[gpu]')"
    return _scaled_mm_problem(Fp8Recipe.from_config(config), device.index or 0)


def stu_shape_problem(config) -> Optional[str]:
    """The STU linears' per-rank sizes that FP8 GEMMs cannot take (multiples of 16)."""
    tp = config.tensor_model_parallel_size
    heads = config.num_attention_heads // tp
    sizes = {
        "hidden_size": config.hidden_size,
        f"num_attention_heads / TP x (2 v_head_dim + 2 qk_head_dim) (UVQK outputs per rank, TP={tp})":
            heads * (2 * config.v_head_dim + 2 * config.qk_head_dim),
        f"num_attention_heads / TP x v_head_dim (output projection inputs per rank, TP={tp})": heads * config.v_head_dim,
    }
    for name, size in sizes.items():
        if size % FP8_GEMM_ALIGNMENT != 0:
            return f"{name} = {size} is not a multiple of {FP8_GEMM_ALIGNMENT}, which FP8 GEMMs (torch._scaled_mm) need"
    return None


@functools.lru_cache(maxsize=None)
def _scaled_mm_problem(recipe: Fp8Recipe, device_index: int) -> Optional[str]:
    """Runs the recipe's GEMM kinds once on 16 x 16 operands (the forward's, and the one
    both gradient GEMMs share): what this torch build and GPU reject (an operand type pair,
    row-wise scales) shows here, not mid-run."""
    from megatron_gr.transformer.fp8.linear import scaled_matmul
    from megatron_gr.transformer.fp8.scaling import Fp8Operand

    device = torch.device("cuda", device_index)
    size = FP8_GEMM_ALIGNMENT

    def operand(dtype):
        scale = torch.ones(size, 1, device=device) if recipe.rowwise else torch.ones(1, device=device)
        return Fp8Operand(torch.ones(size, size, device=device).to(dtype), scale)

    forward, backward = recipe.forward_dtype, recipe.backward_dtype
    bias = torch.zeros(size, dtype=torch.bfloat16, device=device)
    gemms = {
        "forward": (operand(forward), operand(forward), bias, True),
        "gradient": (operand(backward), operand(forward), None, False),
    }
    for name, (a, b, gemm_bias, fast_accum) in gemms.items():
        try:
            scaled_matmul(a, b, out_dtype=torch.bfloat16, bias=gemm_bias, fast_accum=fast_accum)
        except (RuntimeError, ValueError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"torch._scaled_mm rejects the {name} GEMM ({a.data.dtype} x {b.data.dtype}): {first_line}"
    return None
