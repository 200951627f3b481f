"""Checkpoints do not change with FP8: an STU block with FP8 linears has the sharded state
dict of the bf16 block (its amax histories and weight casts stay out of it), a checkpoint
saved with FP8 loads into the block without and back, with every weight equal."""

from __future__ import annotations

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_gr.config import GRTransformerConfig
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.specs import get_stu_block_spec


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Leaves torch's global generator as it found it: later tests in the process draw
    their weights from it."""
    with torch.random.fork_rng():
        yield


def build_block(fp8, seed):
    config = GRTransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=2, qk_head_dim=16, v_head_dim=16, max_seq_len=16,
        hidden_dropout=0.0, use_cpu_initialization=True, init_method_std=0.1, fp8=fp8,
        fp8_recipe="delayed", fp8_amax_history_len=4 if fp8 else 1,
    )
    spec = get_stu_block_spec(config)
    torch.manual_seed(seed)
    return spec.module(config, spec, post_process=False)


def train_once(block):
    """One forward and backward: the FP8 block then holds histories and a weight cast."""
    lengths = torch.tensor([5, 9, 2])
    params = JaggedSeqParams.from_offsets(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), 9,
                                          timestamps=torch.arange(16))
    block(torch.randn(16, 1, 32, requires_grad=True), attention_mask=None, packed_seq_params=params).sum().backward()


def sharded_keys(block) -> set:
    return set(block.sharded_state_dict().keys())


def assert_same_weights(a, b):
    for (name, x), (other, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert name == other
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("direction", ["fp8_to_bf16", "bf16_to_fp8"])
def test_checkpoint_loads_across_fp8(megatron_cpu, tmp_path, direction):
    source_fp8, target_fp8 = ("hybrid", None) if direction == "fp8_to_bf16" else (None, "hybrid")
    source, target = build_block(source_fp8, seed=1), build_block(target_fp8, seed=2)
    train_once(source)
    train_once(target)
    assert sharded_keys(source) == sharded_keys(target)
    assert source.state_dict().keys() == target.state_dict().keys()
    dist_checkpointing.save(source.sharded_state_dict(), str(tmp_path))
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path)))
    assert_same_weights(source, target)
    train_once(target)  # and the loaded block trains
