"""Jagged HSTU attention in Triton: the autograd function and the launch of the forward and
backward kernels. Same signature and semantics as
:func:`megatron_gr.ops.pytorch.hstu_attention.pytorch_hstu_attention`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from megatron_gr.ops.relative_bias import RelativeBiasInputs
from megatron_gr.ops.triton.availability import interpreter_enabled
from megatron_gr.ops.triton.hstu_attention_bwd import hstu_bwd_dkdv_kernel, hstu_bwd_dq_kernel
from megatron_gr.ops.triton.hstu_attention_fwd import hstu_fwd_kernel
from megatron_gr.ops.triton.hstu_configs import backward_config, forward_config, launch_options, uniform_bias_tiles

# Private copies of the relative-bias weight gradients (atomics spread over them).
_BIAS_GRAD_SLOTS = 64
_MAX_TIME_BUCKETS = 46340


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
        TIME_FN=0 if bias is None or bias.time_bucket_fn == "sqrt" else 1,
        NORM_BY_LEN=normalizer == "seq_len",
        FAST_SILU=sixteen_bit and not interpreter_enabled(),
        ASM_GATHER=not interpreter_enabled(),
        PRECISION=("upcast" if interpreter_enabled() else "tf32") if sixteen_bit else "ieee",
    )


def _uniform_bias(bias: Optional[RelativeBiasInputs], max_len: int, cfg) -> bool:
    return bias is not None and uniform_bias_tiles(max_len, bias.position_weights.numel(), cfg)


def _bias_tensors(bias: Optional[RelativeBiasInputs], device):
    if bias is None:
        empty = torch.zeros(1, device=device, dtype=torch.float32)
        return empty, empty, torch.zeros(1, device=device, dtype=torch.int64), 1, 1
    return (
        bias.position_weights.detach().float().contiguous(),
        bias.time_weights.detach().float().contiguous(),
        bias.timestamps.contiguous(),
        bias.position_weights.numel(),
        bias.time_weights.numel(),
    )


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, position_weights, time_weights, offsets, num_targets, timestamps, settings):
        mask, bias, normalizer, max_seq_len, alpha, max_len = settings
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        num_tokens, heads, _ = q.shape
        out = torch.empty(num_tokens, heads, v.shape[2], device=q.device, dtype=v.dtype)
        offsets = offsets.contiguous()
        targets = num_targets.contiguous() if num_targets is not None else offsets
        pos_w, time_w, ts, num_pos, num_time = _bias_tensors(bias, q.device)
        common = _common_args(q, v, mask, bias, normalizer, q.dtype)
        cfg = forward_config(q.shape[2], v.shape[2], q.dtype)
        batch = offsets.numel() - 1
        num_m_blocks = triton.cdiv(max_len, cfg.block_m)
        if num_tokens and batch and num_m_blocks:
            hstu_fwd_kernel[(batch * heads, num_m_blocks)](
                q, k, v, out, offsets, targets, ts, pos_w, time_w,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1),
                heads, num_m_blocks, alpha, 1.0 / max_seq_len,
                mask.contextual_len, mask.max_attn_len, mask.global_prefix_len, num_pos, num_time,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UNIFORM_BIAS=_uniform_bias(bias, max_len, cfg),
                **launch_options(cfg), **common,
            )
        ctx.save_for_backward(q, k, v, offsets, targets, ts, pos_w, time_w)
        ctx.settings = settings
        ctx.weight_dtypes = (
            (position_weights.dtype, time_weights.dtype) if bias is not None else None
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets, targets, ts, pos_w, time_w = ctx.saved_tensors
        mask, bias, normalizer, max_seq_len, alpha, max_len = ctx.settings
        grad_out = _last_dim_contiguous(grad_out)
        num_tokens, heads, dqk = q.shape
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        num_pos, num_time = pos_w.numel(), time_w.numel()
        slots = _BIAS_GRAD_SLOTS if bias is not None else 1
        d_pos = torch.zeros(slots, num_pos, device=q.device, dtype=torch.float32)
        d_time = torch.zeros(slots, num_time, device=q.device, dtype=torch.float32)
        common = _common_args(q, v, mask, bias, normalizer, q.dtype)
        cfg = backward_config(dqk, v.shape[2], q.dtype, has_bias=bias is not None)
        batch = offsets.numel() - 1
        # Atomics add into dq; the dq kernel writes every row itself.
        dq = (torch.zeros if cfg.atomic_dq else torch.empty)(
            q.shape, device=q.device, dtype=torch.float32 if cfg.atomic_dq else q.dtype
        )
        launch = num_tokens and batch and max_len
        scalars = (mask.contextual_len, mask.max_attn_len, mask.global_prefix_len, num_pos, num_time)
        # (blocks, computes dk, computes dv) of each launch of the key-block kernel.
        key_launches = [(cfg.dk or cfg, True, False), (cfg, False, True)] if cfg.split_dkdv else [(cfg, True, True)]
        for kcfg, with_dk, with_dv in key_launches if launch else ():
            num_n_blocks = triton.cdiv(max_len, kcfg.block_n)
            hstu_bwd_dkdv_kernel[(batch * heads, num_n_blocks)](
                q, k, v, grad_out, dq, dk, dv, offsets, targets, ts, pos_w, time_w, d_pos, d_time,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
                dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                heads, num_n_blocks, alpha, 1.0 / max_seq_len, *scalars,
                BLOCK_M=kcfg.block_m, BLOCK_N=kcfg.block_n, ATOMIC_DQ=cfg.atomic_dq and with_dk, NUM_SLOTS=slots,
                WITH_DK=with_dk, WITH_DV=with_dv, UNIFORM_BIAS=_uniform_bias(bias, max_len, kcfg),
                **launch_options(kcfg), **common,
            )
        if launch and not cfg.atomic_dq:
            dq_cfg = cfg.dq or cfg
            num_m_blocks = triton.cdiv(max_len, dq_cfg.block_m)
            hstu_bwd_dq_kernel[(batch * heads, num_m_blocks)](
                q, k, v, grad_out, dq, offsets, targets, ts, pos_w, time_w,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
                heads, num_m_blocks, alpha, 1.0 / max_seq_len, *scalars,
                BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, UNIFORM_BIAS=_uniform_bias(bias, max_len, dq_cfg),
                **launch_options(dq_cfg), **common,
            )
        grad_pos = grad_time = None
        if bias is not None:
            pos_dtype, time_dtype = ctx.weight_dtypes
            grad_pos = d_pos.sum(0).to(pos_dtype) if ctx.needs_input_grad[3] else None
            grad_time = d_time.sum(0).to(time_dtype) if ctx.needs_input_grad[4] else None
        return dq.to(q.dtype), dk, dv, grad_pos, grad_time, None, None, None, None


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
) -> torch.Tensor:
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[2], v.shape[2]) > 256:
        raise ValueError(f"the Triton HSTU attention supports head dims up to 256, got Dqk={q.shape[2]}, Dv={v.shape[2]}")
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
    settings = (mask, relative_bias, normalizer, max_seq_len, float(alpha), max_len)
    if relative_bias is not None:
        pos_w, time_w, ts = relative_bias.position_weights, relative_bias.time_weights, relative_bias.timestamps
    else:
        pos_w = time_w = ts = None
    out = _HSTUAttention.apply(q, k, v, pos_w, time_w, offsets, num_targets, ts, settings)
    return out[..., :dv] if pad_v else out


def _padded_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))
