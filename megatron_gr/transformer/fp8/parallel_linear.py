"""megatron's local column- and row-parallel linears with FP8 GEMMs.

Only ``_forward_impl`` (megatron's local GEMM with its communication) changes: the
sequence-parallel all-gather of the input (reduce-scatter of its gradient) and the
all-reduce of the input gradient are megatron's own mappings around
:func:`fp8_linear`; everything else (parameters, initialisation, the row-parallel output
reduction, bias handling, sharded state dict) is the parent's. The FP8 state (amax
histories, the cached weight cast) is not part of the state dict: checkpoints are those
of the bf16 linears and load both ways.

The weight cast is cached per step through megatron's ``is_first_microbatch`` protocol:
megatron's schedules set the attribute on the first micro-batch of every step (when
``config.fp8`` is set), the first training forward casts and keeps the result, later
micro-batches of the step reuse it. Outside that protocol (no schedule, evaluation,
``torch.no_grad``) every forward casts afresh; a change of train/eval mode drops the cache.
While CUDA graphs capture a layer (``Fp8LinearState.graph_capture``) the cache is neither
read nor filled: a captured cast runs on every replay (reading the current weights), and
a cast made in a graph's memory pool is never handed to a later eager call.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_pg_size

from megatron_gr.config.errors import ConfigError
from megatron_gr.transformer.fp8.linear import Fp8LinearState, WeightCast, fp8_linear
from megatron_gr.transformer.fp8.recipe import FP8_GEMM_ALIGNMENT, Fp8Recipe


class _Fp8WeightCache:
    """The mixin's shared part: the FP8 state and the per-step weight cast."""

    def _init_fp8(self, config, *, input_features_split: bool, output_features_split: bool, local_shape) -> None:
        out_features, in_features = local_shape
        for name, size in (("input features", in_features), ("output features", out_features)):
            if size % FP8_GEMM_ALIGNMENT != 0:
                raise ConfigError(
                    f"{type(self).__name__}: {size} {name} on each tensor-parallel rank is not a multiple of "
                    f"{FP8_GEMM_ALIGNMENT}, which FP8 GEMMs (torch._scaled_mm) need; change the layer sizes or "
                    "unset model.fp8"
                )
        self.fp8_state = Fp8LinearState(
            Fp8Recipe.from_config(config),
            tp_group=self.tp_group,
            input_features_split=input_features_split,
            output_features_split=output_features_split,
        )
        # megatron's schedules set this to True on the first micro-batch of a step
        self.is_first_microbatch: Optional[bool] = None
        self._weight_cast: Optional[WeightCast] = None

    def _current_weight_cast(self, weight: torch.Tensor, *, cacheable: bool) -> WeightCast:
        """``cacheable``: ``weight`` stands for the module's own weight (megatron may pass
        another one in, which is never cached)."""
        if self.fp8_state.graph_capture:  # the graph casts on every replay; its casts live in its pool
            return self.fp8_state.cast_weight(weight)
        training = self.training and torch.is_grad_enabled() and cacheable
        if training and self.is_first_microbatch is False and self._weight_cast is not None:
            return self._weight_cast
        cast = self.fp8_state.cast_weight(weight)
        if training and self.is_first_microbatch:
            self._weight_cast, self.is_first_microbatch = cast, False
        return cast

    def train(self, mode: bool = True):
        # weights may change between modes (an optimizer step, a loaded checkpoint)
        self._weight_cast, self.is_first_microbatch = None, None
        return super().train(mode)

    def _fp8_gemm(self, input_, weight, bias, gradient_accumulation_fusion, grad_output_buffer):
        if grad_output_buffer is not None:
            raise NotImplementedError("FP8 linears do not defer weight-gradient GEMMs (defer_embedding_wgrad_compute)")
        if gradient_accumulation_fusion:
            raise NotImplementedError("FP8 linears return weight gradients to autograd: set gradient_accumulation_fusion=False")
        if not weight.requires_grad:
            return fp8_linear(input_, weight, bias, state=self.fp8_state)
        return fp8_linear(input_, weight, bias, state=self.fp8_state, weight_cast=self._current_weight_cast(weight, cacheable=weight is self.weight))


class Fp8ColumnParallelLinear(_Fp8WeightCache, ColumnParallelLinear):
    """``ColumnParallelLinear`` whose GEMMs run in FP8 (recipe from ``config``)."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        split = get_pg_size(self.tp_group) > 1
        self._init_fp8(
            config, input_features_split=False, output_features_split=split,
            local_shape=(self.output_size_per_partition, self.input_size),
        )

    def _forward_impl(
        self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
        grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
    ):
        group = tp_group if tp_group is not None else self.tp_group
        if sequence_parallel:  # forward all-gather, backward reduce-scatter
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        elif allreduce_dgrad:  # backward all-reduce of the input gradient
            input = copy_to_tensor_model_parallel_region(input, group=group)
        return self._fp8_gemm(input, weight, bias, gradient_accumulation_fusion, grad_output_buffer)


class Fp8RowParallelLinear(_Fp8WeightCache, RowParallelLinear):
    """``RowParallelLinear`` whose GEMMs run in FP8 (recipe from ``config``); megatron's
    forward reduces (or reduce-scatters) the partial outputs and adds the bias."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        split = get_pg_size(self.tp_group) > 1
        self._init_fp8(
            config, input_features_split=split, output_features_split=False,
            local_shape=(self.output_size, self.input_size_per_partition),
        )

    def _forward_impl(
        self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
        grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
    ):
        if allreduce_dgrad or sequence_parallel:
            raise NotImplementedError("megatron's RowParallelLinear communicates around its GEMM, never inside it")
        return self._fp8_gemm(input, weight, bias, gradient_accumulation_fusion, grad_output_buffer)
