"""The settings of the native FP8 linears, read once from megatron's ``TransformerConfig``
FP8 fields (``fp8``, ``fp8_recipe``, ``fp8_amax_history_len``, ``fp8_amax_compute_algo``,
``fp8_margin``, ``fp8_wgrad``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gr.config.fp8_validation import recipe_name

# torch._scaled_mm on CUDA needs the contraction dimension and both dimensions of its
# second operand to be multiples of 16.
FP8_GEMM_ALIGNMENT = 16


@dataclass(frozen=True)
class Fp8Recipe:
    """How a linear quantises its GEMM operands.

    Attributes:
        format: ``e4m3`` (every operand e4m3) or ``hybrid`` (gradients e5m2: more range,
            less precision).
        recipe: ``delayed``: per-tensor scales of activations and gradients from an amax
            history; ``tensorwise``: per-tensor scales from the tensor's own amax (current
            scaling); ``rowwise``: one scale per row of every GEMM operand (per token and
            per output feature), taken along the contraction dimension. Weights are cast
            once per step with their own amax in every recipe (per tensor, or per row for
            ``rowwise``).
        amax_history_len: amaxes kept per tensor under ``delayed`` (one per quantisation,
            i.e. per micro-batch).
        amax_compute_algo: ``max`` of the history or its ``most_recent`` entry.
        margin: scales are ``fp8_max / amax / 2**margin``.
        wgrad: the weight-gradient GEMM in FP8 (False: in the activations' precision).
    """

    format: str = "hybrid"
    recipe: str = "tensorwise"
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    margin: int = 0
    wgrad: bool = True

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn

    @property
    def rowwise(self) -> bool:
        return self.recipe == "rowwise"

    @classmethod
    def from_config(cls, config) -> "Fp8Recipe":
        """From a megatron ``TransformerConfig`` whose ``fp8`` is set (validated there)."""
        if config.fp8 is None:
            raise ValueError("Fp8Recipe.from_config needs config.fp8 set ('e4m3' or 'hybrid')")
        return cls(
            format=config.fp8,
            recipe=recipe_name(config),
            amax_history_len=config.fp8_amax_history_len,
            amax_compute_algo=config.fp8_amax_compute_algo,
            margin=config.fp8_margin,
            wgrad=config.fp8_wgrad,
        )
