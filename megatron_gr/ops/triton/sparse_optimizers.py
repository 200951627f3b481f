"""Fused row-sparse optimizer updates: one pass reads a row's weights, state and gradient
and writes the new weights and state (a fresh row's state is not read). Signature of
:func:`megatron_gr.ops.pytorch.sparse_optimizers.pytorch_sparse_update`."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.dynamic_rows import ROW_WARPS, row_blocks

_OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "adam": 3}


@triton.jit
def _old_state(ptr, offsets, mask, is_new, init):
    """A state's value before the update: ``init`` for fresh rows (not read), else stored."""
    return tl.where(is_new, init, tl.load(ptr + offsets, mask=mask & ~is_new, other=0.0))


@triton.jit(
    do_not_specialize=["n", "lr", "beta1", "beta2", "rest1", "rest2", "eps", "step_size", "bias2_sqrt", "init0", "init1"]
)
def _sparse_update_kernel(
    weights_ptr, state0_ptr, state1_ptr, slots_ptr, grads_ptr, fresh_ptr, scale_ptr, skip_ptr,
    n, dim, lr, beta1, beta2, rest1, rest2, eps, step_size, bias2_sqrt, init0, init1,
    OPTIMIZER: tl.constexpr, HAS_FRESH: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + rows, mask=rows < n, other=-1)
    valid = (rows < n) & (slot >= 0)
    if HAS_SKIP:  # the step's verdict, decided on the device: a skipped step writes nothing
        valid = valid & (tl.load(skip_ptr + rows * 0) == 0)  # the one flag, broadcast to the rows
    grad_scale = tl.load(scale_ptr)
    if HAS_FRESH:
        new = valid & (tl.load(fresh_ptr + slot, mask=valid, other=0) != 0)
    else:
        new = rows < 0  # no row is fresh
    cols = tl.arange(0, BLOCK_D)
    both = valid[:, None] & (cols < dim)[None, :]
    cell = slot[:, None] * dim + cols[None, :]
    g = tl.load(grads_ptr + rows[:, None] * dim + cols[None, :], mask=both, other=0.0).to(tl.float32) * grad_scale
    w = tl.load(weights_ptr + cell, mask=both, other=0.0)
    if OPTIMIZER == 0:
        w = w - lr * g
    elif OPTIMIZER == 1:
        total = _old_state(state0_ptr, cell, both, new[:, None], init0) + g * g
        tl.store(state0_ptr + cell, total, mask=both)
        w = w - tl.div_rn(lr * g, tl.sqrt_rn(total) + eps)
    elif OPTIMIZER == 2:
        total = _old_state(state0_ptr, slot, valid, new, init0) + tl.sum(g * g, axis=1) / dim
        tl.store(state0_ptr + slot, total, mask=valid)
        w = w - tl.div_rn(lr * g, (tl.sqrt_rn(total) + eps)[:, None])
    else:
        m = _old_state(state0_ptr, cell, both, new[:, None], init0) * beta1 + g * rest1
        v = _old_state(state1_ptr, cell, both, new[:, None], init1) * beta2 + g * g * rest2
        tl.store(state0_ptr + cell, m, mask=both)
        tl.store(state1_ptr + cell, v, mask=both)
        w = w - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
    tl.store(weights_ptr + cell, w, mask=both)
    if HAS_FRESH:
        tl.store(fresh_ptr + slot, tl.zeros([BLOCK_R], tl.uint8), mask=new)


def triton_sparse_update(
    weights, states, slots, grads, *, optimizer, lr, step, beta1, beta2, eps, grad_scale, skip=None, fresh=None,
    state_init=(),
) -> None:
    count, dim = slots.numel(), weights.shape[1]
    if count == 0:
        return
    padded = list(states) + [weights] * (2 - len(states))
    inits = list(state_init) + [0.0] * (2 - len(state_init))
    if not torch.is_tensor(grad_scale):  # a fill, not a copy from the host (which would wait)
        grad_scale = torch.full((), float(grad_scale), dtype=torch.float32, device=weights.device)
    block_r, block_d = row_blocks(dim)
    _sparse_update_kernel[(triton.cdiv(count, block_r),)](
        weights, padded[0], padded[1], slots, grads.contiguous(), fresh if fresh is not None else slots,
        grad_scale.float(), skip if skip is not None else slots,
        # 1 - beta is rounded once, from the double, as the reference's Python arithmetic does.
        count, dim, float(lr), float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, float(eps),
        float(lr / (1 - beta1**step)), float(math.sqrt(1 - beta2**step)), float(inits[0]), float(inits[1]),
        OPTIMIZER=_OPTIMIZERS[optimizer], HAS_FRESH=fresh is not None, HAS_SKIP=skip is not None,
        BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=ROW_WARPS,
        # No fused multiply-adds: each product and sum rounds as in the reference's separate
        # tensor operations, so a GPU table's Adam/Adagrad/SGD state follows the CPU one.
        enable_fp_fusion=False,
    )
