"""FLOP counts against hand-computed values and the attention mask itself."""

import itertools

import pytest
import torch

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.models.hstu_flops import attention_pairs, batch_flops, step_flops
from megatron_gr.ops.attention_mask import attention_mask


def _config(**overrides) -> GRTransformerConfig:
    fields = dict(num_layers=2, hidden_size=8, num_attention_heads=2, qk_head_dim=4, v_head_dim=3, max_seq_len=64,
                  num_negatives=5, num_in_batch_negatives=2, relative_attention_bias=False)
    fields.update(overrides)
    return GRTransformerConfig(**fields)


@pytest.mark.parametrize("window, prefix, contextual", list(itertools.product([0, 1, 3], [0, 2], [0, 1, 4])))
def test_attention_pairs_count_what_the_mask_keeps(window, prefix, contextual):
    lengths = torch.tensor([1, 2, 5, 9, 9, 13, 0])
    mask = attention_mask(lengths, 13, max_attn_len=window, global_prefix_len=prefix, contextual_len=contextual)
    expected = int(mask.sum())
    assert attention_pairs(lengths, max_attn_len=window, global_prefix_len=prefix, contextual_len=contextual) == expected


def test_causal_pairs_by_hand():
    assert attention_pairs(torch.tensor([3, 1, 4])) == 6 + 1 + 10  # a plain causal mask: sum of L(L+1)/2


def test_batch_flops_by_hand():
    config = _config()
    flops = batch_flops(config, torch.tensor([3, 1]))  # 4 tokens, 7 causal pairs
    tokens, c, h, dqk, dv = 4, 8, 2, 4, 3
    assert flops.projections == 3 * 2 * (2 * tokens * c * h * (2 * dv + 2 * dqk) + 2 * tokens * h * dv * c)
    assert flops.attention == 3 * 2 * (2 * 7 * h * (dqk + dv))
    assert flops.loss == 3 * 2 * tokens * c * (5 + 2 + 1)
    assert flops.relative_bias == 0 and flops.hyper_connections == 0
    assert flops.total == flops.projections + flops.attention + flops.loss


def test_bias_and_hyper_connections_add_their_share():
    lengths = torch.tensor([3, 1])
    plain = batch_flops(_config(), lengths)
    biased = batch_flops(_config(relative_attention_bias=True), lengths)
    assert biased.relative_bias == 3 * 2 * (2 * 7 * 2) and biased.total == plain.total + biased.relative_bias
    mhc = batch_flops(_config(enable_hyper_connections=True, num_residual_streams=2), lengths)
    n, c, t = 2, 8, 4
    per_layer = 2 * t * n * c * (n * n + 2 * n) + 2 * t * n * c + 2 * t * n * n * c + 2 * t * n * c
    assert mhc.hyper_connections == 3 * 2 * per_layer


def test_step_flops_count_the_loss_per_micro_batch():
    config = _config()
    parts = [torch.tensor([3, 1]), torch.tensor([2])]
    total = step_flops(config, parts)
    assert total.total == batch_flops(config, parts[0]).total + batch_flops(config, parts[1]).total
    one = batch_flops(config, torch.cat(parts))
    # Same tokens and pairs; the loss of one micro-batch over all tokens counts the same too.
    assert total.projections == one.projections and total.attention == one.attention
