"""Forward-step functions for megatron's forward-backward schedules, and the shapes of
the activations that pipeline stages exchange."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.data.jagged import JaggedBatch
from megatron_gr.training.metrics import metric_sums


def _token_loss(losses: torch.Tensor):
    """Sum of per-token losses and their count: megatron divides gradients by the tokens of
    the whole global batch (``calculate_per_token_loss``)."""
    total = losses.sum()
    count = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    return total, count, {"loss_sum_and_tokens": torch.stack([total.detach().double(), count.double()])}


def _rank_metrics(ranks: torch.Tensor):
    zero = torch.zeros((), device=ranks.device)
    count = torch.tensor(0, dtype=torch.int, device=ranks.device)
    return zero, count, {"metric_sums": metric_sums(ranks)}


def train_forward_step(device: torch.device, data_iterator: Iterator[JaggedBatch], model):
    batch = next(data_iterator).to(device)
    return model(batch), _token_loss


def eval_forward_step(device: torch.device, data_iterator: Iterator[JaggedBatch], model):
    batch = next(data_iterator).to(device)
    return model(batch), _rank_metrics


def forward_step_for(device: torch.device, *, training: bool):
    return partial(train_forward_step if training else eval_forward_step, device)


def stage_tensor_shape(config: GRTransformerConfig, num_tokens: int) -> tuple[int, int, int]:
    """Shape of what one pipeline stage sends the next for a micro-batch of ``num_tokens``
    tokens: ``[T, 1, C]``; ``[T, 1, n C]`` with hyper-connections (the n residual streams
    travel between stages: the first stage expands, only the last contracts); under
    sequence parallelism this rank's slice, ``T / tp`` rounded up (``TokenSplit`` pads)."""
    if config.sequence_parallel:
        num_tokens = -(-num_tokens // config.tensor_model_parallel_size)
    width = config.hidden_size * (config.num_residual_streams if config.enable_hyper_connections else 1)
    return (num_tokens, 1, width)


def schedule_shapes(config: GRTransformerConfig, batches: list[JaggedBatch]) -> dict:
    """The shape arguments of megatron's forward-backward schedule for ``batches``.

    Micro-batches are packed ``[T, 1, C]`` tokens of different T, so megatron exchanges
    each tensor's shape before the tensor (``variable_seq_lengths``) and the declared
    shape is the longest micro-batch's. megatron builds that shape as ``[T, 1,
    hidden_size]``: under pipeline parallelism ``adjust_tensor_shapes_fn`` replaces it
    with :func:`stage_tensor_shape`, n C wide with hyper-connections (only megatron's
    schedule without virtual stages, the one used here, takes the function).
    """
    longest = max(batch.num_tokens for batch in batches)
    shapes = {"seq_length": longest, "micro_batch_size": 1}
    if config.pipeline_model_parallel_size > 1:
        shape = stage_tensor_shape(config, longest)
        shapes["adjust_tensor_shapes_fn"] = lambda recv, send: ([shape], [shape])
    return shapes
