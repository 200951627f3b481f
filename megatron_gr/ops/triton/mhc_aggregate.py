"""mHC aggregate in Triton: the sublayer input ``u[t] = sum_i h_pre[t, i] x[t, i]``
``[T, C]``. Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_aggregate`
(float32 sums, the result in x's dtype).

Every stream is its own ``[BLOCK_T, BLOCK_C]`` tile (a tuple of n), so sums over streams
are register adds. Forward: a program reads the n stream tiles once and writes one tile.
Backward: a program walks the channels of ``BLOCK_T`` tokens, reading x and the output
gradient once, writing ``dx = h_pre ⊗ du`` and accumulating the products ``x ⊙ du`` per
stream in registers; ``dh_pre = x . du`` is reduced over the channels once at the end.
Nothing is saved but the inputs (x is kept by the merge and the mappings anyway); the
reference upcasts 16-bit streams to a float32 copy first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.mhc_configs import blocks
from megatron_gr.ops.triton.mhc_tiles import map_column, stream_tiles


@triton.jit(do_not_specialize=["num_tokens"])
def _aggregate_fwd(X, H, Out, num_tokens, C, n: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    mask = live[:, None] & (c < C)[None, :]
    x = stream_tiles(X, rows[:, None] * (n * C) + c[None, :], mask, C, n)
    out = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(n):
        out += map_column(H, rows * n + i, live) * x[i]
    tl.store(Out + rows[:, None] * C + c[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _aggregate_bwd(X, H, Grad, DX, DH, num_tokens, C, n: tl.constexpr, NP: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    h = ()
    products = ()  # x_i * du summed over the channel chunks, reduced once at the end
    for i in tl.static_range(n):
        h = h + (map_column(H, rows * n + i, live),)
        products = products + (tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32),)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        mask = live[:, None] & (c < C)[None, :]
        stream0 = rows[:, None] * (n * C) + c[None, :]
        du = tl.load(Grad + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        x = stream_tiles(X, stream0, mask, C, n)
        summed = ()
        for i in tl.static_range(n):
            tl.store(DX + stream0 + i * C, (h[i] * du).to(DX.dtype.element_ty), mask=mask)
            summed = summed + (products[i] + x[i] * du,)
        products = summed
    slot = tl.arange(0, NP)[None, :]
    dh = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    for i in tl.static_range(n):
        dh = tl.where(slot == i, tl.sum(products[i], axis=1, keep_dims=True), dh)
    tl.store(DH + rows[:, None] * n + slot, dh, mask=live[:, None] & (slot < n))


def aggregate_forward(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """The forward kernel on contiguous streams x ``[T, n, C]`` and maps ``h_pre`` ``[T, n]``:
    ``u`` ``[T, C]`` in x's dtype."""
    num_tokens, n, channels = x.shape
    out = torch.empty(num_tokens, channels, device=x.device, dtype=x.dtype)
    cfg = blocks("aggregate_fwd", streams=n, dtype=x.dtype)
    if num_tokens:
        grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(channels, cfg.block_c))
        _aggregate_fwd[grid](x, h_pre, out, num_tokens, channels, n=n, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c,
                             num_warps=cfg.num_warps)
    return out


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        x, h_pre = x.contiguous(), h_pre.contiguous()
        ctx.save_for_backward(x, h_pre)
        return aggregate_forward(x, h_pre)

    @staticmethod
    def backward(ctx, grad):
        x, h_pre = ctx.saved_tensors
        num_tokens, n, channels = x.shape
        dx = torch.empty_like(x)
        dh = torch.empty(num_tokens, n, device=x.device, dtype=torch.float32)
        cfg = blocks("aggregate_bwd", streams=n, dtype=x.dtype)
        if num_tokens:
            _aggregate_bwd[(triton.cdiv(num_tokens, cfg.block_t),)](
                x, h_pre, grad.contiguous(), dx, dh, num_tokens, channels, n=n, NP=triton.next_power_of_2(n),
                BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
            )
        return dx, dh.to(h_pre.dtype)


def triton_mhc_aggregate(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_aggregate`."""
    return _Aggregate.apply(x, h_pre)
