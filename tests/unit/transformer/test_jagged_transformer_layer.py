"""megatron's transformer layer with the jagged softmax core attention (SASRec) against the
same layer built from megatron's own local spec, run on each sequence alone (float64):
outputs and input gradients."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import build_module

from megatron_gr.config import GRTransformerConfig
from megatron_gr.config.errors import ConfigError
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.jagged_softmax_attention import JaggedSoftmaxAttention
from megatron_gr.transformer.specs import get_jagged_transformer_layer_spec, get_transformer_layer_spec

C = 8


def make_config(**overrides) -> GRTransformerConfig:
    return GRTransformerConfig(**{
        **dict(num_layers=1, hidden_size=C, num_attention_heads=2, block_type="transformer", max_seq_len=12,
               hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float64, use_cpu_initialization=True,
               init_method_std=0.3),
        **overrides,
    })


@pytest.mark.parametrize("lengths", [[3, 1, 5], [6]])
def test_jagged_layer_equals_megatron_layer_per_sequence(megatron_cpu, lengths):
    config = make_config()
    jagged = build_module(get_jagged_transformer_layer_spec(), config=config)
    assert isinstance(jagged.self_attention.core_attention, JaggedSoftmaxAttention)
    plain = build_module(get_transformer_layer_spec(use_transformer_engine=False), config=config)
    plain.load_state_dict(jagged.state_dict())
    g = torch.Generator().manual_seed(len(lengths))
    x = torch.randn(sum(lengths), 1, C, dtype=torch.float64, generator=g, requires_grad=True)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = jagged(x, attention_mask=None, packed_seq_params=JaggedSeqParams.from_offsets(offsets, max(lengths)))
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (dx,) = torch.autograd.grad(out, x, grad_out)
    for b in range(len(lengths)):
        s, e = offsets[b].item(), offsets[b + 1].item()
        piece = x.detach()[s:e].clone().requires_grad_()
        ref, _ = plain(piece, attention_mask=None)  # megatron's causal softmax on one sequence
        (ref_dx,) = torch.autograd.grad(ref, piece, grad_out[s:e])
        torch.testing.assert_close(out[s:e], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx[s:e], ref_dx, rtol=1e-12, atol=1e-12)


def test_attention_dropout_drops_weights_in_training_only(megatron_cpu):
    attention = JaggedSoftmaxAttention(make_config(attention_dropout=0.5), 1, AttnMaskType.causal, "self")
    q = torch.randn(5, 2, 4, dtype=torch.float64)
    params = JaggedSeqParams.from_offsets(torch.tensor([0, 5]), 5)
    attention.eval()
    first = attention(q, q, q, None, packed_seq_params=params)
    torch.testing.assert_close(first, attention(q, q, q, None, packed_seq_params=params))
    attention.train()
    assert not torch.allclose(first, attention(q, q, q, None, packed_seq_params=params))


def test_transformer_blocks_reject_stu_only_settings():
    with pytest.raises(ConfigError, match="max_attn_len=4 applies to STU layers only"):
        make_config(max_attn_len=4)
    with pytest.raises(ConfigError, match="attention_dropout=0.1 is not supported by STU attention"):
        make_config(block_type="stu", attention_dropout=0.1)
