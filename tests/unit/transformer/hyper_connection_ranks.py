"""A block of hyper-connection transformer layers and the checks each of 2 gloo ranks runs
against the single-rank reference (``tests/unit/transformer/test_hyper_connection_parallel.py``):
TP=2 with and without sequence parallelism, DP=2 under megatron's DistributedDataParallel,
and a TP=2 checkpoint for the one-rank load.

Tolerances: the ranks compute in fp32 in another order than the reference (tensor-parallel
partial sums and all-reduces, data-parallel averaging), and such differences scale with the
terms summed, not with each result. Outputs and input gradients are compared against their
largest entry; parameter gradients against max(their largest entry, GRAD_FLOOR x the largest
gradient entry of the block), because the gate (alpha) gradients sum products of both signs
over every token into a few numbers. Seen on one CPU: outputs and input gradients within
4e-7 of their largest entry, gradients within 6.5e-6 of their own (alpha, 4.1e-8 of 6.3e-3),
so RTOL leaves 170x and more. A doubled, halved or missing reduction moves a tensor by a
sizeable fraction of its largest entry and still fails: the smallest gradient tensor
(largest entry 9e-4) is 130x the bound.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gr.config import GRTransformerConfig, TrainingConfig
from megatron_gr.transformer.specs import get_transformer_block_spec
from tests.support.parity import assert_close_to_scale

WORLD = 2
S, B, C = 8, 4, 16
RTOL = 1e-4
GRAD_FLOOR = 1e-2


def block_config(**overrides) -> GRTransformerConfig:
    values = dict(
        num_layers=2, hidden_size=C, num_attention_heads=4, ffn_hidden_size=32, hidden_dropout=0.0,
        use_cpu_initialization=True, enable_hyper_connections=True, num_residual_streams=4,
        mhc_init_gating_factor=0.3, init_method_std=0.1,
    )
    values.update(overrides)
    return GRTransformerConfig(**values)


def build_block(config: GRTransformerConfig):
    spec = get_transformer_block_spec(config, use_transformer_engine=False)
    return spec.module(config, spec)


def loss_weights(shape) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, int(torch.tensor(shape).prod())).view(shape)


def forward_backward(block, x, weights):
    x = x.clone().requires_grad_()
    out = block(x, attention_mask=None)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def check_layouts(directory: str) -> None:
    """On each rank: TP=2 without and with sequence parallelism (the latter saves a
    checkpoint into ``directory/tp2_checkpoint``), then DP=2, each against
    ``directory/reference.pt``. Raises on the first difference."""
    from megatron.core import parallel_state

    from megatron_gr.training.runtime import initialize

    reference = torch.load(Path(directory) / "reference.pt")
    rank = dist.get_rank()
    initialize(TrainingConfig(device="cpu", seed=5), tensor_parallel_size=WORLD)
    _check_tensor_parallel(reference, rank, sequence_parallel=False)
    _check_tensor_parallel(reference, rank, sequence_parallel=True, save_to=Path(directory) / "tp2_checkpoint")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    _check_data_parallel(reference)


def _grad_floor(reference) -> float:
    return GRAD_FLOOR * max(float(g.abs().max()) for g in reference["grads"].values())


def _load_shards(block, weights, rank):
    """Each tensor-parallel parameter gets its slice of the full reference weight."""
    state = {}
    for name, full in weights.items():
        param = dict(block.named_parameters()).get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            full = full.chunk(WORLD, dim=param.partition_dim)[rank]
        state[name] = full
    block.load_state_dict(state)


def _check_tensor_parallel(reference, rank, *, sequence_parallel, save_to=None):
    from megatron.core import dist_checkpointing

    config = block_config(tensor_model_parallel_size=WORLD, sequence_parallel=sequence_parallel)
    block = build_block(config)
    _load_shards(block, reference["weights"], rank)
    x, weights = reference["x"], loss_weights((S, B, C))
    rows = slice(rank * S // WORLD, (rank + 1) * S // WORLD)
    if sequence_parallel:  # tokens split over the tensor-parallel ranks
        x, weights = x[rows], weights[rows]
    out, dx = forward_backward(block, x, weights)
    where = f"TP={WORLD} sequence_parallel={sequence_parallel}"
    expected_out, expected_dx = reference["out"], reference["dx"]
    if sequence_parallel:
        expected_out, expected_dx = expected_out[rows], expected_dx[rows]
    assert_close_to_scale(out, expected_out, rtol=RTOL, what=f"{where}: output")
    assert_close_to_scale(dx, expected_dx, rtol=RTOL, what=f"{where}: input gradient")
    num_replicated_sp, floor = 0, _grad_floor(reference)
    for name, param in block.named_parameters():
        grad, expected = param.grad, reference["grads"][name]
        if getattr(param, "tensor_model_parallel", False):
            expected = expected.chunk(WORLD, dim=param.partition_dim)[rank]
        elif sequence_parallel:
            # finalize_model_grads sums these over the tensor-parallel group
            assert getattr(param, "sequence_parallel", False), f"{where}: {name} is not marked sequence_parallel"
            dist.all_reduce(grad)
            num_replicated_sp += 1
        assert_close_to_scale(grad, expected, rtol=RTOL, floor=floor, what=f"{where}: grad of {name}")
    if sequence_parallel:
        assert num_replicated_sp >= 2 * 3 * 2  # at least the mHC parameters of 2 layers
    if save_to is not None:
        save_to.mkdir(exist_ok=True)
        dist.barrier()
        dist_checkpointing.save({"model": block.sharded_state_dict()}, str(save_to))


def _check_data_parallel(reference):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    rank = dist.get_rank()
    config = block_config()
    block = build_block(config)
    block.load_state_dict(reference["weights"])
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), block)
    cols = slice(rank * B // WORLD, (rank + 1) * B // WORLD)  # the batch split over data-parallel ranks
    x, weights = reference["x"][:, cols], loss_weights((S, B, C))[:, cols]
    out, _ = forward_backward(ddp, x, weights)
    ddp.finish_grad_sync()  # averages over the data-parallel group
    assert_close_to_scale(out, reference["out"][:, cols], rtol=RTOL, what="DP=2: output")
    floor = _grad_floor(reference)
    for name, param in block.named_parameters():
        assert_close_to_scale(param.main_grad * WORLD, reference["grads"][name], rtol=RTOL, floor=floor,
                              what=f"DP=2: grad of {name}")
