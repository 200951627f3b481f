"""The FP8 linear ``y = x W^T + b`` as one autograd function over ``torch._scaled_mm``.

Three GEMMs, each on FP8 operands stored ``[rows, contraction]`` row-major (the second one
transposed into the column-major layout ``_scaled_mm`` wants, free):

    forward   y  [T, N] = x  [T, K]  . W  [N, K]^T      e4m3 x e4m3
    dgrad     dx [T, K] = dy [T, N]  . W^T[K, N]^T      e5m2 (hybrid) or e4m3 x e4m3
    wgrad     dW [N, K] = dy^T[N, T'] . x^T[K, T']^T    T' = T padded to 16 with zeros

The weight is cast once per step (:class:`WeightCast`, cached by the parallel linears
between micro-batches). Activations and gradients follow the recipe (``Fp8Recipe``).
Per-tensor recipes keep the forward's FP8 input for the weight gradient, transposed and
padded by the same cast (half the bytes of the bf16 input); ``rowwise`` keeps the input in
its own precision, because the weight gradient scales it along the other axis (tokens).

Amaxes of tensors split over the tensor-parallel group are reduced (max) over it, so every
rank scales with the global amax and a TP run quantises exactly as one rank would
(:class:`Fp8LinearState`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_gr.transformer.fp8.recipe import FP8_GEMM_ALIGNMENT, Fp8Recipe
from megatron_gr.transformer.fp8.scaling import (
    AmaxHistory,
    Fp8Operand,
    quantize_per_column_transposed,
    quantize_per_row,
    quantize_per_tensor,
)


def cast_kernel_for(device: torch.device) -> str:
    """The fused Triton cast on CUDA (the run checks triton is installed), the PyTorch
    reference elsewhere."""
    return "triton" if device.type == "cuda" else "pytorch"


def scaled_matmul(
    a: Fp8Operand, b: Fp8Operand, *, out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None, fast_accum: bool
) -> torch.Tensor:
    """``a [M, K] . b [N, K]^T`` dequantised to ``out_dtype`` (plus ``bias``).

    What ``torch._scaled_mm`` (torch 2.11-2.13) takes on CUDA: the first operand row-major,
    the second column-major (``b.data.t()`` of a row-major ``[N, K]``), K and N multiples
    of 16 (M is free), not both e5m2; float32 scales, one element each (per tensor) or
    ``[M, 1]`` and ``[1, N]`` (row-wise); a bias only with a bf16 or fp16 output (added
    here otherwise: the CPU tests run float32).
    """
    fused_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype
    scale_b = b.scale_inv if b.scale_inv.dim() == 1 else b.scale_inv.reshape(1, -1)  # per tensor [1] as a's
    out = torch._scaled_mm(
        a.data,
        b.data.t(),
        scale_a=a.scale_inv,
        scale_b=scale_b,
        bias=bias if fused_bias else None,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )
    if bias is not None and not fused_bias:
        out = out + bias
    return out


class Fp8LinearState:
    """What one linear keeps between calls: its recipe, the amax histories of its input and
    output gradient (delayed scaling), and which of its feature dimensions the
    tensor-parallel group splits.

    Reductions, from the layout: a per-tensor amax is reduced when the tensor is split
    (column-parallel: weight and output gradient; row-parallel: input and weight); per-row
    amaxes are reduced when the GEMM's contraction dimension is split (row-parallel
    forward, column-parallel input gradient). The token dimension is never split inside
    the GEMMs: megatron gathers sequence-parallel inputs before them.
    """

    def __init__(
        self,
        recipe: Fp8Recipe,
        *,
        tp_group: Optional[dist.ProcessGroup] = None,
        input_features_split: bool = False,
        output_features_split: bool = False,
        kernel: Optional[str] = None,
    ):
        self.recipe = recipe
        self.kernel = kernel  # None: cast_kernel_for(device)
        group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
        self._input_group = group if input_features_split else None
        self._output_group = group if output_features_split else None
        self._weight_group = group if input_features_split or output_features_split else None
        delayed = recipe.recipe == "delayed"
        self.input_history = self._history(recipe.forward_dtype) if delayed else None
        self.grad_history = self._history(recipe.backward_dtype) if delayed else None
        self._graph_capture = False
        # Under graph capture: [T] bool, the rows of the GEMM inputs and output gradients that
        # are real tokens (a graph's batch is padded); only they enter the amaxes.
        self.token_rows: Optional[torch.Tensor] = None

    @property
    def histories(self) -> list[AmaxHistory]:
        """The delayed recipe's amax histories (none for the others)."""
        return [history for history in (self.input_history, self.grad_history) if history is not None]

    @property
    def graph_capture(self) -> bool:
        """Set while CUDA graphs capture (or emulate replaying) this linear
        (``graph_capture.py``): weights are cast on every call, never from a cache, and
        delayed scales are chosen on the device."""
        return self._graph_capture

    @graph_capture.setter
    def graph_capture(self, on: bool) -> None:
        self._graph_capture = on
        for history in self.histories:
            history.graph_capture = on

    def _history(self, dtype: torch.dtype) -> AmaxHistory:
        recipe = self.recipe
        return AmaxHistory(
            length=recipe.amax_history_len, compute_algo=recipe.amax_compute_algo, dtype=dtype, margin=recipe.margin
        )

    def kernel_for(self, tensor: torch.Tensor) -> str:
        return self.kernel or cast_kernel_for(tensor.device)

    def _rows(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``[T, 1]`` bool of the rows of ``x`` ``[T, F]`` whose amaxes count (None: all)."""
        rows = self.token_rows
        if rows is None or not self._graph_capture:
            return None
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"FP8 linear under graph capture: {x.shape[0]} rows, {rows.shape[0]} token flags")
        return rows.view(-1, 1)

    def quantize_input(self, x: torch.Tensor, *, transposed: bool) -> tuple[Fp8Operand, Optional[Fp8Operand]]:
        """The input ``[T, K]`` for the forward GEMM and, per tensor with ``transposed``, also
        ``[K, T']`` for the weight-gradient GEMM from the same cast (rowwise: never, its
        weight gradient scales the input along the tokens)."""
        recipe = self.recipe
        if recipe.rowwise:  # rows along K: reduced when K is split
            return quantize_per_row(
                x, dtype=recipe.forward_dtype, margin=recipe.margin, group=self._input_group, kernel=self.kernel_for(x)
            ), None
        return quantize_per_tensor(
            x, dtype=recipe.forward_dtype, margin=recipe.margin, group=self._input_group, kernel=self.kernel_for(x),
            history=self.input_history, transposed=transposed, pad_to=FP8_GEMM_ALIGNMENT, rows=self._rows(x),
        )

    def quantize_grad(self, grad: torch.Tensor, *, rows: bool, transposed: bool):
        """Per-tensor recipes: the output gradient ``[T, N]`` for the input-gradient GEMM
        and/or transposed and padded for the weight-gradient GEMM, one cast, one scale."""
        recipe = self.recipe
        return quantize_per_tensor(
            grad, dtype=recipe.backward_dtype, margin=recipe.margin, group=self._output_group,
            kernel=self.kernel_for(grad), history=self.grad_history, out=rows, transposed=transposed,
            pad_to=FP8_GEMM_ALIGNMENT, rows=self._rows(grad),
        )

    def quantize_grad_rows(self, grad: torch.Tensor) -> Fp8Operand:
        """Rowwise: the output gradient per token, along N (reduced when N is split)."""
        recipe = self.recipe
        return quantize_per_row(
            grad, dtype=recipe.backward_dtype, margin=recipe.margin, group=self._output_group,
            kernel=self.kernel_for(grad),
        )

    def quantize_along_tokens(self, x: torch.Tensor, *, dtype: torch.dtype) -> Fp8Operand:
        """Rowwise weight gradient: ``x [T, F]`` as ``[F, T']``, one scale per feature taken
        along the tokens (never split: no reduction)."""
        return quantize_per_column_transposed(
            x, dtype=dtype, margin=self.recipe.margin, group=None, kernel=self.kernel_for(x), pad_to=FP8_GEMM_ALIGNMENT,
            rows=self._rows(x),
        )

    def cast_weight(self, weight: torch.Tensor) -> "WeightCast":
        return WeightCast(weight, self)


class WeightCast:
    """A weight ``[N, K]`` in FP8 for one step: the forward operand, and the input-gradient
    operand ``[K, N]`` (per tensor: from the same cast; rowwise: cast along N on first
    use). Scales from the weight's own amax, reduced over the tensor-parallel group when
    the weight is split."""

    def __init__(self, weight: torch.Tensor, state: Fp8LinearState):
        recipe, kernel = state.recipe, state.kernel_for(weight)
        self._state = state
        self._weight = weight.detach()
        self._dgrad: Optional[Fp8Operand] = None
        if recipe.rowwise:  # rows along K: reduced when K is split
            self.forward = quantize_per_row(
                self._weight, dtype=recipe.forward_dtype, margin=recipe.margin, group=state._input_group, kernel=kernel
            )
        else:
            self.forward, self._dgrad = quantize_per_tensor(
                self._weight, dtype=recipe.forward_dtype, margin=recipe.margin, group=state._weight_group,
                kernel=kernel, transposed=True,
            )

    def for_dgrad(self) -> Fp8Operand:
        if self._dgrad is None:  # rowwise: along N, reduced when N is split
            state = self._state
            self._dgrad = quantize_per_column_transposed(
                self._weight, dtype=state.recipe.forward_dtype, margin=state.recipe.margin,
                group=state._output_group, kernel=state.kernel_for(self._weight),
            )
        return self._dgrad


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., F]`` as ``[rows, F]`` (2-d tensors as they are: no dispatch)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state: Fp8LinearState, weight_cast: WeightCast):
        recipe = state.recipe
        x2d = _rows(x)
        fp8_wgrad = ctx.needs_input_grad[1] and recipe.wgrad and not recipe.rowwise
        x_fp8, x_t = state.quantize_input(x2d, transposed=fp8_wgrad)
        out = scaled_matmul(x_fp8, weight_cast.forward, out_dtype=x.dtype, bias=bias, fast_accum=True)
        keep_input = recipe.rowwise or not recipe.wgrad
        # per tensor, the weight gradient's input operand comes out of the forward's cast
        ctx.save_for_backward(x2d if keep_input else None, x_t.data if x_t is not None else None,
                              x_t.scale_inv if x_t is not None else None)
        ctx.state, ctx.weight_cast, ctx.input_shape = state, weight_cast, x.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        state, recipe = ctx.state, ctx.state.recipe
        saved, x_t_data, x_t_scale_inv = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grad = _rows(grad_output)
        dx = dw = db = None
        fp8_wgrad = need_dw and recipe.wgrad
        if recipe.rowwise:
            if need_dx:
                dx = scaled_matmul(state.quantize_grad_rows(grad), ctx.weight_cast.for_dgrad(), out_dtype=grad.dtype,
                                   fast_accum=False)
            if fp8_wgrad:
                dw = scaled_matmul(
                    state.quantize_along_tokens(grad, dtype=recipe.backward_dtype),
                    state.quantize_along_tokens(saved, dtype=recipe.forward_dtype),
                    out_dtype=ctx.weight_dtype, fast_accum=False,
                )
        elif need_dx or fp8_wgrad:
            grad_fp8, grad_t = state.quantize_grad(grad, rows=need_dx, transposed=fp8_wgrad)
            if need_dx:
                dx = scaled_matmul(grad_fp8, ctx.weight_cast.for_dgrad(), out_dtype=grad.dtype, fast_accum=False)
            if fp8_wgrad:
                dw = scaled_matmul(grad_t, Fp8Operand(x_t_data, x_t_scale_inv), out_dtype=ctx.weight_dtype,
                                   fast_accum=False)
        if need_dw and not recipe.wgrad:
            dw = (grad.t() @ saved.to(grad.dtype)).to(ctx.weight_dtype)
        if need_db:
            db = grad.sum(dim=0, dtype=torch.float32)
            db = db if ctx.bias_dtype == torch.float32 else db.to(ctx.bias_dtype)
        if dx is not None and len(ctx.input_shape) != 2:
            dx = dx.view(ctx.input_shape)
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    state: Fp8LinearState,
    weight_cast: Optional[WeightCast] = None,
) -> torch.Tensor:
    """``x [..., K] . weight [N, K]^T + bias`` with FP8 GEMMs in forward and backward.

    Args:
        x: activations in bf16 (or float32: the CPU tests), any leading shape.
        weight, bias: the parameters (bias may be None).
        state: the linear's :class:`Fp8LinearState` (recipe, histories, layout).
        weight_cast: this step's FP8 weight (``state.cast_weight(weight)``); None casts now.

    Returns:
        ``[..., N]`` in the dtype of ``x``.
    """
    if weight_cast is None:
        weight_cast = state.cast_weight(weight)
    return _Fp8LinearFunction.apply(x, weight, bias, state, weight_cast)
