"""Jagged HSTU attention in Triton: the autograd function and the launch of the forward and
backward kernels. Same signature and semantics as
:func:`megatron_gr.ops.pytorch.hstu_attention.pytorch_hstu_attention`."""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from megatron_gr.ops.key_layout import KeyLayout
from megatron_gr.ops.relative_bias import RelativeBiasInputs
from megatron_gr.ops.triton.availability import interpreter_enabled
from megatron_gr.ops.triton.hstu_attention_bwd import hstu_bwd_dkdv_kernel, hstu_bwd_dq_kernel
from megatron_gr.ops.triton.hstu_attention_fwd import hstu_fwd_kernel
from megatron_gr.ops.triton.hstu_configs import backward_config, forward_config, launch_options, uniform_bias_tiles

# Private copies of the relative-bias weight gradients (atomics spread over them).
_BIAS_GRAD_SLOTS = 64
_MAX_TIME_BUCKETS = 46340
# The kernels' TIME_FN code of each bucket function of ``bucketize_time_gaps``.
_TIME_FNS = {"sqrt": 0, "log": 1, "hstu_log": 2}


@dataclass(frozen=True)
class _Mask:
    causal: bool
    max_attn_len: int
    contextual_len: int
    global_prefix_len: int
    has_targets: bool

    def flags(self) -> dict:
        window = self.max_attn_len > 0
        return dict(
            CAUSAL=self.causal, HAS_TARGETS=self.has_targets, HAS_CONTEXT=self.contextual_len > 0,
            HAS_WINDOW=window, HAS_PREFIX=window and self.global_prefix_len > 0,
        )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common_args(q, v, mask: _Mask, bias: Optional[RelativeBiasInputs], normalizer: str, precision_dtype):
    """Constexprs shared by every kernel of a call (the launches add UNIFORM_BIAS)."""
    dqk, dv = q.shape[2], v.shape[2]
    sixteen_bit = precision_dtype in (torch.bfloat16, torch.float16)
    return dict(
        DQK=dqk, DV=dv, BLOCK_DQK=_padded_dim(dqk), BLOCK_DV=_padded_dim(dv),
        **mask.flags(), HAS_BIAS=bias is not None,
        TIME_FN=0 if bias is None else _TIME_FNS[bias.time_bucket_fn],
        NORM_BY_LEN=normalizer == "seq_len",
        FAST_SILU=sixteen_bit and not interpreter_enabled(),
        ASM_GATHER=not interpreter_enabled(),
        PRECISION=("upcast" if interpreter_enabled() else "tf32") if sixteen_bit else "ieee",
    )


@functools.lru_cache(maxsize=None)
def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One float32 and one int64 element per device, passed where a bias tensor would go
    without a bias (the kernels neither read nor write them then): made once, not two
    allocations and fills per layer and direction."""
    return torch.zeros(1, device=device, dtype=torch.float32), torch.zeros(1, device=device, dtype=torch.int64)


def _bias_tensors(bias: Optional[RelativeBiasInputs], device):
    if bias is None:
        weights, stamps = _placeholders(torch.device(device))
        return weights, weights, stamps, 1, 1
    return (
        bias.position_weights.detach().float().contiguous(),
        bias.time_weights.detach().float().contiguous(),
        bias.timestamps.contiguous(),
        bias.position_weights.numel(),
        bias.time_weights.numel(),
    )


@dataclass(frozen=True)
class _Settings:
    mask: _Mask
    bias: Optional[RelativeBiasInputs]
    normalizer: str
    max_seq_len: int
    alpha: float
    max_len: int  # the longest query segment
    keys: Optional[KeyLayout]  # None: queries and keys share ``offsets``


def _layout_args(settings: _Settings, offsets: torch.Tensor, ts: torch.Tensor) -> tuple:
    """The kernels' key-layout arguments (placeholders without a layout) and SHARDED."""
    keys = settings.keys
    if keys is None:
        return (offsets, offsets, offsets, ts), False
    key_ts = keys.key_timestamps.contiguous() if settings.bias is not None else ts
    return (keys.key_offsets.contiguous(), keys.query_start.contiguous(), keys.seq_lengths.contiguous(), key_ts), True


def _uniform_bias(settings: _Settings, cfg) -> bool:
    """Whether a launch takes the bias's uniform-tile path: by the farthest key position."""
    if settings.bias is None:
        return False
    extent = settings.keys.max_key_len if settings.keys is not None else settings.max_len
    return uniform_bias_tiles(extent, settings.bias.position_weights.numel(), cfg)


def _query_blocks(settings: _Settings, block_m: int) -> int:
    """Query-block programs per segment: a window's blocks are aligned from position 0, so
    its first block may start before its first row (one block more)."""
    return triton.cdiv(settings.max_len, block_m) + (settings.keys is not None)


def _forward(q, k, v, offsets, targets, bias_tensors: tuple, settings: _Settings) -> torch.Tensor:
    mask, bias = settings.mask, settings.bias
    num_tokens, heads, _ = q.shape
    out = torch.empty(num_tokens, heads, v.shape[2], device=q.device, dtype=v.dtype)
    pos_w, time_w, ts, num_pos, num_time = bias_tensors
    layout, sharded = _layout_args(settings, offsets, ts)
    common = _common_args(q, v, mask, bias, settings.normalizer, q.dtype)
    cfg = forward_config(q.shape[2], v.shape[2], q.dtype)
    batch = offsets.numel() - 1
    num_m_blocks = _query_blocks(settings, cfg.block_m)
    if num_tokens and batch and settings.max_len:
        hstu_fwd_kernel[(batch * heads, num_m_blocks)](
            q, k, v, out, offsets, targets, ts, pos_w, time_w,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            heads, num_m_blocks, settings.alpha, 1.0 / settings.max_seq_len,
            mask.contextual_len, mask.max_attn_len, mask.global_prefix_len, num_pos, num_time, *layout,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SHARDED=sharded, UNIFORM_BIAS=_uniform_bias(settings, cfg),
            **launch_options(cfg), **common,
        )
    return out


def _backward(grad_out, q, k, v, offsets, targets, bias_tensors: tuple, settings: _Settings) -> tuple:
    """``(dq, dk, dv, d_position_weights, d_time_weights)``, the bias weights' in float32
    (None without a bias)."""
    mask, bias = settings.mask, settings.bias
    grad_out = _last_dim_contiguous(grad_out)
    num_tokens, heads, dqk = q.shape
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    pos_w, time_w, ts = bias_tensors[:3]
    num_pos, num_time = pos_w.numel(), time_w.numel()
    layout, sharded = _layout_args(settings, offsets, ts)
    if bias is not None:
        d_pos = torch.zeros(_BIAS_GRAD_SLOTS, num_pos, device=q.device, dtype=torch.float32)
        d_time = torch.zeros(_BIAS_GRAD_SLOTS, num_time, device=q.device, dtype=torch.float32)
    else:  # unused by the kernels without a bias
        d_pos = d_time = _placeholders(q.device)[0].view(1, 1)
    slots = d_pos.shape[0]
    common = _common_args(q, v, mask, bias, settings.normalizer, q.dtype)
    cfg = backward_config(dqk, v.shape[2], q.dtype, has_bias=bias is not None)
    batch = offsets.numel() - 1
    # Atomics add into dq; the dq kernel writes every row itself.
    dq = (torch.zeros if cfg.atomic_dq else torch.empty)(
        q.shape, device=q.device, dtype=torch.float32 if cfg.atomic_dq else q.dtype
    )
    key_len = settings.keys.max_key_len if sharded else settings.max_len
    launch = num_tokens and batch and settings.max_len
    scalars = (mask.contextual_len, mask.max_attn_len, mask.global_prefix_len, num_pos, num_time)
    # (blocks, computes dk, computes dv) of each launch of the key-block kernel.
    key_launches = [(cfg.dk or cfg, True, False), (cfg, False, True)] if cfg.split_dkdv else [(cfg, True, True)]
    for kcfg, with_dk, with_dv in key_launches if launch else ():
        num_n_blocks = triton.cdiv(key_len, kcfg.block_n)
        hstu_bwd_dkdv_kernel[(batch * heads, num_n_blocks)](
            q, k, v, grad_out, dq, dk, dv, offsets, targets, ts, pos_w, time_w, d_pos, d_time,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            heads, num_n_blocks, settings.alpha, 1.0 / settings.max_seq_len, *scalars, *layout,
            BLOCK_M=kcfg.block_m, BLOCK_N=kcfg.block_n, ATOMIC_DQ=cfg.atomic_dq and with_dk, NUM_SLOTS=slots,
            WITH_DK=with_dk, WITH_DV=with_dv, SHARDED=sharded, UNIFORM_BIAS=_uniform_bias(settings, kcfg),
            **launch_options(kcfg), **common,
        )
    if launch and not cfg.atomic_dq:
        dq_cfg = cfg.dq or cfg
        num_m_blocks = _query_blocks(settings, dq_cfg.block_m)
        hstu_bwd_dq_kernel[(batch * heads, num_m_blocks)](
            q, k, v, grad_out, dq, offsets, targets, ts, pos_w, time_w,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
            heads, num_m_blocks, settings.alpha, 1.0 / settings.max_seq_len, *scalars, *layout,
            BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, SHARDED=sharded,
            UNIFORM_BIAS=_uniform_bias(settings, dq_cfg), **launch_options(dq_cfg), **common,
        )
    bias_grads = (d_pos.sum(0), d_time.sum(0)) if bias is not None else (None, None)
    return dq.to(q.dtype), dk, dv, *bias_grads


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, position_weights, time_weights, offsets, num_targets, timestamps, settings):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        offsets = offsets.contiguous()
        targets = num_targets.contiguous() if num_targets is not None else offsets
        bias_tensors = _bias_tensors(settings.bias, q.device)
        out = _forward(q, k, v, offsets, targets, bias_tensors, settings)
        ctx.save_for_backward(q, k, v, offsets, targets, *bias_tensors[:3])
        ctx.settings = settings
        ctx.weight_dtypes = (
            (position_weights.dtype, time_weights.dtype) if settings.bias is not None else None
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets, targets, *bias_tensors = ctx.saved_tensors
        dq, dk, dv, d_pos, d_time = _backward(grad_out, q, k, v, offsets, targets, bias_tensors, ctx.settings)
        grad_pos = grad_time = None
        if ctx.settings.bias is not None:
            pos_dtype, time_dtype = ctx.weight_dtypes
            grad_pos = d_pos.to(pos_dtype) if ctx.needs_input_grad[3] else None
            grad_time = d_time.to(time_dtype) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, grad_pos, grad_time, None, None, None, None


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    normalizer: str = "max_seq_len",
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_len: int = 0,
    num_targets: Optional[torch.Tensor] = None,
    global_prefix_len: int = 0,
    relative_bias: Optional[RelativeBiasInputs] = None,
    max_len: Optional[int] = None,
    key_layout: Optional[KeyLayout] = None,
) -> torch.Tensor:
    q, k, v, settings, dv = _prepare(
        q, k, v, offsets, max_seq_len=max_seq_len, alpha=alpha, normalizer=normalizer, causal=causal,
        max_attn_len=max_attn_len, contextual_len=contextual_len, num_targets=num_targets,
        global_prefix_len=global_prefix_len, relative_bias=relative_bias, max_len=max_len, key_layout=key_layout,
    )
    if relative_bias is not None:
        pos_w, time_w, ts = relative_bias.position_weights, relative_bias.time_weights, relative_bias.timestamps
    else:
        pos_w = time_w = ts = None
    out = _HSTUAttention.apply(q, k, v, pos_w, time_w, offsets, num_targets, ts, settings)
    return out[..., :dv] if out.shape[2] != dv else out


def triton_hstu_attention_backward(grad_out: torch.Tensor, q, k, v, offsets, **kwargs) -> tuple:
    """``(dq, dk, dv, d_position_weights, d_time_weights)`` of :func:`triton_hstu_attention`
    from its inputs, without its autograd graph: the backward kernels only (they recompute
    the scores from q and k)."""
    dqk, dv = q.shape[2], v.shape[2]
    q, k, v, settings, _ = _prepare(q, k, v, offsets, **kwargs)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if grad_out.shape[2] != v.shape[2]:
        grad_out = F.pad(grad_out, (0, v.shape[2] - grad_out.shape[2]))
    offsets = offsets.contiguous()
    num_targets = kwargs.get("num_targets")
    targets = num_targets.contiguous() if num_targets is not None else offsets
    bias = settings.bias
    dq, dk, dv_, d_pos, d_time = _backward(grad_out, q, k, v, offsets, targets, _bias_tensors(bias, q.device), settings)
    if bias is not None:
        d_pos, d_time = d_pos.to(bias.position_weights.dtype), d_time.to(bias.time_weights.dtype)
    return dq[..., :dqk], dk[..., :dqk], dv_[..., :dv], d_pos, d_time


def _prepare(
    q, k, v, offsets, *, max_seq_len, alpha, normalizer="max_seq_len", causal=True, max_attn_len=0,
    contextual_len=0, num_targets=None, global_prefix_len=0, relative_bias=None, max_len=None, key_layout=None,
):
    """Checks what the kernels support and pads odd head dims: ``(q, k, v, settings, Dv)``."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[2], v.shape[2]) > 256:
        raise ValueError(f"the Triton HSTU attention supports head dims up to 256, got Dqk={q.shape[2]}, Dv={v.shape[2]}")
    if relative_bias is not None and relative_bias.query_timestamps is not None:
        # Queries and keys read one timestamp array in the kernels; a second array for the
        # queries belongs with context parallelism's split query/key layouts.
        raise ValueError(
            "the Triton HSTU attention buckets |ts_i - ts_j| only: relative bias query_timestamps "
            "(time_bias_origin='query') need the PyTorch reference (kernel='pytorch')"
        )
    if relative_bias is not None and relative_bias.time_weights.numel() > _MAX_TIME_BUCKETS:
        raise ValueError(
            f"the Triton HSTU attention supports up to {_MAX_TIME_BUCKETS} time buckets (squared gaps stay "
            f"in int32), got {relative_bias.time_weights.numel()}"
        )
    # Pad odd head dims to the kernel's power-of-two block with zeros (q.k, and the kept
    # output columns, are unchanged): in the one H100 run, Dqk=40 / Dv=24 through the
    # kernel's own column masks gave wrong outputs while every power-of-two dim passed.
    dqk, dv = q.shape[2], v.shape[2]
    pad_qk, pad_v = _padded_dim(dqk) - dqk, _padded_dim(dv) - dv
    if pad_qk or pad_v:
        q, k = F.pad(q, (0, pad_qk)), F.pad(k, (0, pad_qk))
        v = F.pad(v, (0, pad_v))
    if max_len is None:
        max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    mask = _Mask(causal, max_attn_len, contextual_len, global_prefix_len, num_targets is not None)
    settings = _Settings(mask, relative_bias, normalizer, max_seq_len, float(alpha), max_len, key_layout)
    return q, k, v, settings, dv


def _padded_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))
