"""Keyed initialization: a module's initial values depend on the run seed and its name only,
so a layer built alone (as a later pipeline stage builds it) equals the same layer built
after all earlier ones, and the global generator is left untouched."""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_gr.config import GRTransformerConfig
from megatron_gr.seeding import derive_seed, keyed_init
from megatron_gr.transformer.specs import get_stu_block_spec, get_stu_layer_spec


def config(**extra) -> GRTransformerConfig:
    return GRTransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2, qk_head_dim=8, v_head_dim=8,
                               max_seq_len=32, use_cpu_initialization=True, **extra)


def test_derived_seeds_depend_on_every_part_of_the_key():
    seeds = {derive_seed(1, "init", "layer", 3), derive_seed(2, "init", "layer", 3), derive_seed(1, "init", "layer", 4),
             derive_seed(1, "init", "table", 3), derive_seed(1, "init", "layer", "3"), derive_seed(1, "init", "layer")}
    assert len(seeds) == 6
    assert derive_seed(1, "init", "layer", 3) == derive_seed(1, "init", "layer", 3) < 2**63


def test_a_layer_built_alone_equals_the_layer_built_in_its_block(megatron_cpu):
    for mhc in (False, True):
        cfg = config(enable_hyper_connections=mhc, num_residual_streams=2)
        spec = get_stu_block_spec(cfg, init_seed=11)
        torch.manual_seed(0)
        block = spec.module(cfg, spec)
        torch.manual_seed(1)  # another global generator state: must not matter
        layer_spec = get_stu_layer_spec(relative_attention_bias=True, enable_hyper_connections=mhc, init_seed=11)
        third = build_module(layer_spec, config=cfg, layer_number=3)
        assert third.layer_number == 3
        got, want = third.state_dict(), block.layers[2].state_dict()
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[name], value), (mhc, name)
        other = block.layers[1].state_dict()
        assert not torch.equal(other["uvqk_proj.weight"], want["uvqk_proj.weight"])  # layers differ


def test_keyed_init_restores_the_global_generator():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with keyed_init(9, "x"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with keyed_init(9, "x"):
        assert torch.equal(torch.rand(3), inside)
