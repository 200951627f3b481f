"""A plain (replicated, not tensor-parallel) ``torch.nn.Linear`` whose GEMMs run in FP8:
the ranking tower's fusion layers.

Every tensor-parallel rank holds the whole weight and sees the same (gathered) rows, so
each computes the same amaxes and nothing is reduced. ``torch._scaled_mm`` needs both
feature sizes to be multiples of 16; other sizes (a fusion layer fed by the timestamp
postprocessor's ``hidden + 2 x periods`` features, say) are zero-padded to the next
multiple for the GEMM only: the zeros change neither the amaxes nor the result, and the
parameters, the state dict and the gradients keep the module's own shape (checkpoints are
those of ``torch.nn.Linear``).

The weight is cast once per step through megatron's ``is_first_microbatch`` protocol, as
in the parallel linears (``parallel_linear.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_gr.transformer.fp8.linear import fp8_linear
from megatron_gr.transformer.fp8.parallel_linear import _Fp8WeightCache
from megatron_gr.transformer.fp8.recipe import FP8_GEMM_ALIGNMENT


def _padding(size: int) -> int:
    return -size % FP8_GEMM_ALIGNMENT


class Fp8Linear(_Fp8WeightCache, torch.nn.Linear):
    """``torch.nn.Linear`` with FP8 GEMMs (recipe from the model ``config``)."""

    tp_group = None  # replicated: every rank's amaxes are already the same

    def __init__(self, in_features: int, out_features: int, *, config, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self._pad_in, self._pad_out = _padding(in_features), _padding(out_features)
        self._init_fp8(
            config, input_features_split=False, output_features_split=False,
            local_shape=(out_features + self._pad_out, in_features + self._pad_in),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self._pad_in or self._pad_out:
            x = F.pad(x, (0, self._pad_in))
            weight = F.pad(weight, (0, self._pad_in, 0, self._pad_out))
            bias = None if bias is None else F.pad(bias, (0, self._pad_out))
        out = fp8_linear(x, weight, bias, state=self.fp8_state, weight_cast=self._current_weight_cast(weight, cacheable=True))
        return out[..., : self.out_features] if self._pad_out else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_state.recipe.recipe}"
