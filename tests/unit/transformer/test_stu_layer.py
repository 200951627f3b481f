"""STU layer: float64 gradient check, and its forward against the HSTU equations written
out with plain tensor ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from tests.unit.ops.attention_reference import dense_attention
from tests.unit.transformer.helpers import jagged, make_layer


@pytest.mark.parametrize("bias", [False, True])
def test_stu_layer_gradcheck_float64(megatron_cpu, bias):
    layer = make_layer(bias=bias)
    params, g = jagged([3, 1, 4], seed=0)
    x = torch.randn(8, 1, 8, dtype=torch.float64, generator=g, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x, *weights):
        out, _ = functional_call(layer, dict(zip(names, weights)), (x,), {"packed_seq_params": params})
        return out

    assert torch.autograd.gradcheck(f, (x, *values), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_stu_layer_matches_equations(megatron_cpu):
    layer = make_layer(bias=True)
    lengths = [4, 1, 6]
    params, g = jagged(lengths, seed=1)
    x = torch.randn(sum(lengths), 1, 8, dtype=torch.float64, generator=g)
    out, _ = layer(x, packed_seq_params=params)

    c = layer.config
    h = x.squeeze(1)
    normed = F.layer_norm(h, (8,), layer.input_layernorm.weight, layer.input_layernorm.bias, c.layernorm_epsilon)
    uvqk = F.silu(normed @ layer.uvqk_proj.weight.t() + layer.uvqk_proj.bias).view(-1, 2, 3 + 3 + 4 + 4)
    u, v, q, k = uvqk[..., :3], uvqk[..., 3:6], uvqk[..., 6:10], uvqk[..., 10:]
    # relative bias: position bucket min(|i - j|, 4), time bucket floor(sqrt|dt|) clipped at 5
    n = max(lengths)
    bias = torch.zeros(len(lengths), n, n, dtype=torch.float64)
    start = 0
    for b, m in enumerate(lengths):
        ts = params.timestamps[start : start + m]
        for i in range(m):
            for j in range(m):
                pos = min(abs(i - j), 4)
                tb = min(int(abs(int(ts[i]) - int(ts[j])) ** 0.5), 5)
                bias[b, i, j] = layer.relative_bias.position_weights[pos] + layer.relative_bias.time_weights[tb]
        start += m
    attn = dense_attention(
        q, k, v, lengths, alpha=c.alpha, max_seq_len=c.max_seq_len, normalizer="max_seq_len",
        causal=True, window=0, contextual=0, targets=None, bias=bias,
    ).reshape(-1, 6)
    ln = layer.attention_output_layernorm
    gated = F.layer_norm(attn, (6,), ln.weight, ln.bias, c.layernorm_epsilon) * u.reshape(-1, 6)
    expected = h + gated @ layer.output_proj.weight.t() + layer.output_proj.bias
    torch.testing.assert_close(out.squeeze(1), expected, rtol=1e-10, atol=1e-10)


def test_dropout_only_in_training(megatron_cpu):
    layer = make_layer(bias=False, dropout=0.5)
    params, g = jagged([5, 3], seed=2)
    x = torch.randn(8, 1, 8, dtype=torch.float64, generator=g)
    layer.eval()
    a, _ = layer(x, packed_seq_params=params)
    b, _ = layer(x, packed_seq_params=params)
    assert torch.equal(a, b)
    layer.train()
    c, _ = layer(x, packed_seq_params=params)
    assert not torch.allclose(a, c)


def test_layer_needs_jagged_params(megatron_cpu):
    layer = make_layer(bias=False)
    with pytest.raises(ValueError, match="JaggedSeqParams"):
        layer(torch.zeros(3, 1, 8, dtype=torch.float64))


def test_dropout_masks_follow_the_token_keys(megatron_cpu):
    """With the batch's keys, a sequence gets the same dropout (so the same output) in any
    batch: alone, or after another sequence; other keys or another seed drop other elements."""
    layer = make_layer(bias=True, dropout=0.5)
    params, g = jagged([5, 3], seed=3)
    x = torch.randn(8, 1, 8, dtype=torch.float64, generator=g)
    keys = torch.tensor([0, 1, 2, 3, 4, 12, 13, 14])  # samples 0 and 1 of max_seq_len 12
    both, _ = layer(x, packed_seq_params=JaggedSeqParams.from_offsets(
        params.offsets, 5, timestamps=params.timestamps, dropout_seed=7, token_keys=keys))
    second = JaggedSeqParams.from_offsets(torch.tensor([0, 3]), 3, timestamps=params.timestamps[5:],
                                          dropout_seed=7, token_keys=keys[5:])
    alone, _ = layer(x[5:], packed_seq_params=second)
    torch.testing.assert_close(alone, both[5:], rtol=0, atol=1e-12)
    for seed, shifted in ((7, keys[5:] + 1), (8, keys[5:])):
        other = JaggedSeqParams.from_offsets(torch.tensor([0, 3]), 3, timestamps=params.timestamps[5:],
                                             dropout_seed=seed, token_keys=shifted)
        assert not torch.allclose(layer(x[5:], packed_seq_params=other)[0], alone)
    layer.eval()
    assert not torch.allclose(layer(x[5:], packed_seq_params=second)[0], alone)  # the dropout was active
