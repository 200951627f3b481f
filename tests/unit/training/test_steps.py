"""The shapes given to megatron's schedule: what a pipeline stage sends is ``[T, 1, C]``,
``[T, 1, n C]`` with hyper-connections, this rank's padded slice of T under sequence
parallelism; under pipeline parallelism that shape replaces megatron's ``hidden_size``
wide one."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.config import GRTransformerConfig
from megatron_gr.data.jagged import JaggedBatch
from megatron_gr.training.steps import schedule_shapes, stage_tensor_shape
from megatron_gr.transformer.sequence_parallel import TokenSplit
from megatron_gr.transformer.specs import get_stu_block_spec
from tests.unit.transformer.helpers import jagged

MHC = {"enable_hyper_connections": True, "num_residual_streams": 3}
TP2_SP = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
PP2 = {"pipeline_model_parallel_size": 2, "pipeline_dtype": torch.float32}


def model_config(**fields) -> GRTransformerConfig:
    values = dict(num_layers=4, hidden_size=16, num_attention_heads=2, qk_head_dim=8, v_head_dim=8, max_seq_len=64,
                  use_cpu_initialization=True)
    return GRTransformerConfig(**{**values, **fields})


def batch(num_tokens: int) -> JaggedBatch:
    ids = torch.ones(num_tokens, dtype=torch.long)
    return JaggedBatch(item_ids=ids, timestamps=ids, ratings=ids, offsets=torch.tensor([0, num_tokens]),
                       user_ids=torch.zeros(1, dtype=torch.long), max_len=num_tokens)


class _Group:  # the one thing TokenSplit asks of a process group
    def size(self) -> int:
        return 2


@pytest.mark.parametrize("fields, shape", [
    ({}, (37, 1, 16)),
    (MHC, (37, 1, 48)),
    ({**MHC, "tensor_model_parallel_size": 2}, (37, 1, 48)),
    ({**MHC, **TP2_SP}, (19, 1, 48)),
    (TP2_SP, (19, 1, 16)),
])
def test_stage_tensor_shape(fields, shape):
    config = model_config(**fields)
    assert stage_tensor_shape(config, 37) == shape
    if config.sequence_parallel:  # the slice TokenSplit gives each rank: 37 tokens + 1 padding, halved
        split = TokenSplit.for_tokens(37, _Group())
        assert (split.num_tokens + split.padding) // 2 == shape[0]


def test_a_first_stage_sends_the_stage_tensor_shape(megatron_cpu):
    config = model_config(**MHC, num_layers=2)
    spec = get_stu_block_spec(config)
    first_stage = spec.module(config, spec, post_process=False)
    params, g = jagged([20, 5, 12], seed=4)
    sent = first_stage(torch.randn(37, 1, 16, generator=g), attention_mask=None, packed_seq_params=params)
    assert tuple(sent.shape) == stage_tensor_shape(config, 37)


def test_schedule_shapes():
    batches = [batch(12), batch(37), batch(5)]
    plain = schedule_shapes(model_config(**MHC), batches)
    # megatron's schedule without pipeline stages refuses adjust_tensor_shapes_fn
    assert plain == {"seq_length": 37, "micro_batch_size": 1}
    config = model_config(**MHC, **TP2_SP, **PP2)
    piped = schedule_shapes(config, batches)
    assert piped.keys() == {"seq_length", "micro_batch_size", "adjust_tensor_shapes_fn"}
    megatrons = [(37 // 2, 1, 16)]  # megatron's own: hidden_size wide
    assert piped["adjust_tensor_shapes_fn"](megatrons, megatrons) == ([(19, 1, 48)], [(19, 1, 48)])
