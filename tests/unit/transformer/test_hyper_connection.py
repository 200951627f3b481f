"""Hyper-connection module and layers against hand-written references (float64), the
plain-residual start, precision under megatron's Float16Module, and the specs."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from torch.func import functional_call

from megatron_gr.config import GRTransformerConfig
from megatron_gr.transformer.hyper_connection import HyperConnectionModule
from megatron_gr.transformer.hyper_connection_block import HyperConnectionTransformerBlock
from megatron_gr.transformer.hyper_connection_layers import HyperConnectionSTULayer, HyperConnectionTransformerLayer
from megatron_gr.transformer.specs import (
    get_stu_block_spec,
    get_stu_layer_spec,
    get_transformer_block_spec,
    get_transformer_layer_spec,
)
from tests.unit.ops.mhc_reference import reference_mappings
from tests.unit.transformer.helpers import jagged

N, C = 3, 8


def mhc_config(dtype=torch.float64, **overrides) -> GRTransformerConfig:
    values = dict(
        num_layers=2, hidden_size=C, num_attention_heads=2, qk_head_dim=4, v_head_dim=3, max_seq_len=12,
        hidden_dropout=0.0, params_dtype=dtype, use_cpu_initialization=True, relative_attention_bias=True,
        num_position_buckets=5, num_time_buckets=6, init_method_std=0.3, enable_hyper_connections=True,
        num_residual_streams=N, mhc_init_gating_factor=0.5, ffn_hidden_size=16,
    )
    values.update(overrides)
    return GRTransformerConfig(**values)


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms, biases and mHC parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "layernorm" in name or name.endswith("alpha"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def reference_merge(x, h_pre, h_post, h_res, sublayer):
    """x [T, n, C]: the sublayer reads sum_i h_pre_i x_i, stream i becomes
    sum_j h_res_ij x_j + h_post_i y, written as loops."""
    num_tokens, n, _ = x.shape
    u = torch.stack([sum(h_pre[t, i] * x[t, i] for i in range(n)) for t in range(num_tokens)])
    y = sublayer(u)
    return torch.stack([
        torch.stack([sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * y[t] for i in range(n)])
        for t in range(num_tokens)
    ])


def test_module_parameters_stay_float32_under_half_precision(megatron_cpu):
    config = mhc_config(dtype=torch.float32)
    module = HyperConnectionModule(config)
    wrapped = Float16Module(mhc_config(dtype=torch.float32, bf16=True), torch.nn.Sequential(module, torch.nn.Linear(2, 2)))
    assert wrapped.module[1].weight.dtype == torch.bfloat16
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    module.half()
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    module.double()  # a widening cast applies
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    assert all(getattr(p, "sequence_parallel") is False for p in module.parameters())


def test_initial_maps_are_a_plain_residual_start(megatron_cpu):
    module = HyperConnectionModule(mhc_config(mhc_init_gating_factor=0.0))
    streams = torch.randn(5, 2, N * C, dtype=torch.float64)
    h_pre, h_post, h_res = module.mappings(streams)
    torch.testing.assert_close(h_pre, torch.full((10, N), 1 / N, dtype=torch.float64))
    torch.testing.assert_close(h_post, torch.ones(10, N, dtype=torch.float64))
    expected = torch.full((N, N), 0.2 / (N - 1), dtype=torch.float64).fill_diagonal_(0.8)
    torch.testing.assert_close(h_res, expected.expand(10, N, N))


def test_stu_layer_matches_hand_written_reference(megatron_cpu):
    config = mhc_config()
    layer = build_module(get_stu_layer_spec(relative_attention_bias=True, enable_hyper_connections=True), config=config)
    plain = build_module(get_stu_layer_spec(relative_attention_bias=True), config=config)
    perturb_(layer, seed=0)
    missing, _ = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing
    assert isinstance(layer, HyperConnectionSTULayer)
    params, g = jagged([4, 1, 6], seed=1)
    x = torch.randn(11, 1, N * C, dtype=torch.float64, generator=g)
    out, _ = layer(x, packed_seq_params=params)

    hc = layer.hyper_connection
    streams = x.view(11, N, C)
    maps = reference_mappings(streams, hc.projection, hc.alpha, hc.bias, config.mhc_sinkhorn_iterations, config.layernorm_epsilon)

    def sublayer(u):  # the plain layer's residual branch: plain(u) - u
        return plain(u.unsqueeze(1), packed_seq_params=params)[0].squeeze(1) - u

    expected = reference_merge(streams, *maps, sublayer)
    assert out.shape == (11, 1, N * C)
    torch.testing.assert_close(out.view(11, N, C), expected, rtol=1e-10, atol=1e-10)


def test_transformer_layer_matches_hand_written_reference(megatron_cpu):
    config = mhc_config(hidden_dropout=0.0, num_query_groups=2, kv_channels=4)
    layer = build_module(get_transformer_layer_spec(enable_hyper_connections=True, use_transformer_engine=False), config=config)
    assert isinstance(layer, HyperConnectionTransformerLayer)
    perturb_(layer, seed=2)
    s, b = 5, 2
    x = torch.randn(s, b, N * C, dtype=torch.float64)
    out, _ = layer(x)

    iterations, eps = config.mhc_sinkhorn_iterations, config.layernorm_epsilon

    def step(streams, hc, norm, sublayer):
        maps = reference_mappings(streams, hc.projection, hc.alpha, hc.bias, iterations, eps)

        def branch(u):  # tokens are s-major: [s b, C] -> [s, b, C] for megatron's modules
            y, bias = sublayer(norm(u.view(s, b, C)))
            return (y + bias).reshape(s * b, C)

        return reference_merge(streams, *maps, branch)

    streams = step(x.view(s * b, N, C), layer.attention_hyper_connection, layer.input_layernorm, lambda h: layer.self_attention(h, attention_mask=None))
    streams = step(streams, layer.mlp_hyper_connection, layer.pre_mlp_layernorm, layer.mlp)
    torch.testing.assert_close(out.view(s * b, N, C), streams, rtol=1e-10, atol=1e-10)


def test_stu_layer_gradcheck_float64(megatron_cpu):
    config = mhc_config(mhc_sinkhorn_iterations=4)
    layer = build_module(get_stu_layer_spec(relative_attention_bias=False, enable_hyper_connections=True), config=config)
    perturb_(layer, seed=3)
    params, g = jagged([3, 2], seed=4)
    x = torch.randn(5, 1, N * C, dtype=torch.float64, generator=g, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x, *weights):
        return functional_call(layer, dict(zip(names, weights)), (x,), {"packed_seq_params": params})[0]

    assert torch.autograd.gradcheck(f, (x, *values), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_block_with_closed_gates_equals_the_plain_block(megatron_cpu):
    """alpha = 0 and equal copies in: the n streams stay equal copies of the plain
    residual stream, so the mHC block computes what the plain block does."""
    config = mhc_config(mhc_init_gating_factor=0.0, hidden_dropout=0.0)
    plain_config = mhc_config(enable_hyper_connections=False, hidden_dropout=0.0)
    spec, plain_spec = get_stu_block_spec(config), get_stu_block_spec(plain_config)
    assert spec.module is HyperConnectionTransformerBlock and plain_spec.module is TransformerBlock
    block = spec.module(config, spec)
    plain = plain_spec.module(plain_config, plain_spec)
    plain.load_state_dict(block.state_dict(), strict=False)
    params, g = jagged([4, 6], seed=5)
    x = torch.randn(10, 1, C, dtype=torch.float64, generator=g)
    out = block(x, attention_mask=None, packed_seq_params=params)
    torch.testing.assert_close(out, plain(x, attention_mask=None, packed_seq_params=params), rtol=1e-12, atol=1e-12)


def test_bf16_block_keeps_float32_maps_and_tracks_the_float32_block(megatron_cpu):
    config = mhc_config(dtype=torch.float32)
    spec = get_transformer_block_spec(config, use_transformer_engine=False)
    block = spec.module(config, spec)
    half = spec.module(config, spec)
    half.load_state_dict(block.state_dict())
    wrapped = Float16Module(mhc_config(dtype=torch.bfloat16, bf16=True), half)
    maps = [m for m in half.modules() if isinstance(m, HyperConnectionModule)]
    assert len(maps) == 4 and all(p.dtype == torch.float32 for m in maps for p in m.parameters())
    assert half.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    x = torch.randn(6, 2, C)
    out = wrapped(x, attention_mask=None)
    assert out.dtype == torch.float32  # Float16Module returns float32 on the last stage
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for m in maps for p in m.parameters())
    torch.testing.assert_close(out, block(x, attention_mask=None), rtol=0.1, atol=0.1)


def test_layers_reject_what_they_do_not_support(megatron_cpu):
    config = mhc_config()
    layer = build_module(get_transformer_layer_spec(enable_hyper_connections=True, use_transformer_engine=False), config=config)
    with pytest.raises(NotImplementedError, match="inference"):
        layer(torch.zeros(2, 1, N * C, dtype=torch.float64), inference_context=object())
    stu = build_module(get_stu_layer_spec(relative_attention_bias=False, enable_hyper_connections=True), config=config)
    with pytest.raises(ValueError, match="JaggedSeqParams"):
        stu(torch.zeros(2, 1, N * C, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not split into 3 residual streams"):
        stu.hyper_connection.mappings(torch.zeros(2, 1, 10, dtype=torch.float64))
