"""Builders shared by the transformer tests: a small float64 STU layer, jagged batch
parameters, and hyper-connection blocks (STU or transformer layers, optionally with mHC
recompute) with their inputs and forward-backward runners (one block, or two pipeline
stages as megatron's schedule runs them) that start from given RNG states."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel.schedules import custom_backward, deallocate_output_tensor
from megatron.core.transformer.spec_utils import build_module

from megatron_gr.config import GRTransformerConfig
from megatron_gr.training.live_memory import LiveTensorBytes
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.specs import get_stu_block_spec, get_stu_layer_spec, get_transformer_block_spec


def make_layer(*, bias: bool, dtype=torch.float64, dropout=0.0, backend="pytorch", **config):
    config = GRTransformerConfig(**{
        **dict(
            num_layers=1, hidden_size=8, num_attention_heads=2, qk_head_dim=4, v_head_dim=3,
            max_seq_len=12, hidden_dropout=dropout, params_dtype=dtype, use_cpu_initialization=True,
            relative_attention_bias=bias, num_position_buckets=5, num_time_buckets=6, init_method_std=0.3,
        ),
        **config,
    })
    layer = build_module(get_stu_layer_spec(relative_attention_bias=bias, backend=backend), config=config)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in layer.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return layer


def jagged(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ts = torch.cat([torch.sort(torch.randint(0, 50, (n,), generator=g))[0] for n in lengths])
    return JaggedSeqParams.from_offsets(offsets, max(lengths), timestamps=ts), g


def config(kind: str, *, recompute_layers=None, recompute=True, **overrides) -> GRTransformerConfig:
    values = dict(
        num_layers=4, hidden_size=32, num_attention_heads=2, qk_head_dim=8, v_head_dim=8, max_seq_len=64,
        hidden_dropout=0.3, use_cpu_initialization=True, enable_hyper_connections=True, num_residual_streams=4,
        mhc_init_gating_factor=0.2, ffn_hidden_size=32, relative_attention_bias=kind == "stu",
    )
    if recompute:
        values.update(recompute_granularity="selective", recompute_modules=["mhc"], mhc_recompute_layer_num=recompute_layers)
    values.update(overrides)
    return GRTransformerConfig(**values)


def build(kind: str, cfg: GRTransformerConfig, *, backend="pytorch", **stage):
    if kind == "stu":
        spec = get_stu_block_spec(cfg, backend=backend)
    else:
        spec = get_transformer_block_spec(cfg, use_transformer_engine=False, backend=backend)
    return spec.module(cfg, spec, **stage)


def run(block, x, kwargs, rng_states, measure=False):
    """Forward and backward from fixed RNG states: output, grads, held and peak bytes."""
    torch.set_rng_state(rng_states[0])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(rng_states[1]))
    x = x.clone().requires_grad_()
    tracker = LiveTensorBytes()
    with tracker:
        out = block(x, **kwargs)
        held = tracker.current()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out.detach(), x.grad, grads, held, tracker.peak


def block_inputs(kind: str):
    g = torch.Generator().manual_seed(7)
    if kind == "stu":
        params, _ = jagged([40, 24, 33, 31], seed=8)
        x = torch.randn(128, 1, 32, generator=g)
        return x, {"attention_mask": None, "packed_seq_params": params}
    return torch.randn(32, 4, 32, generator=g), {"attention_mask": None}


def run_two_stages(first, last, x, kwargs, rng_states):
    """Two pipeline stages as megatron's schedule runs them: the first stage's output
    ``[s, b, n C]`` is sent (copied), freed (``deallocate_output_tensor``), and reached again
    in the backward only through its autograd graph (``custom_backward``)."""
    torch.set_rng_state(rng_states[0])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(rng_states[1]))
    x = x.clone().requires_grad_()
    sent = first(x, **kwargs)
    received = sent.detach().clone().requires_grad_()
    deallocate_output_tensor(sent, deallocate_pipeline_outputs=True)
    last.set_input_tensor(received)
    out = last(None, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    custom_backward(sent, received.grad)
    grads = {f"{stage}.{name}": p.grad for stage, block in (("first", first), ("last", last))
             for name, p in block.named_parameters()}
    return received.detach(), out.detach(), x.grad, grads
