"""Forward-step functions for megatron's forward-backward schedules, and the shapes of
the activations that pipeline stages exchange."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.data.jagged import JaggedBatch
from megatron_gr.models.registry import TrainSpec


def _forward(device: torch.device, reduce, data_iterator: Iterator, model):
    batch = next(data_iterator).to(device)
    return model(batch), reduce


def forward_step_for(spec: TrainSpec, device: torch.device, *, training: bool):
    """megatron's ``forward_step_func``: the next micro-batch through the model, with the
    spec's loss (training) or evaluation statistics as the loss function."""
    return partial(_forward, device, spec.loss if training else spec.evaluation_statistics)


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
        recv = send = stage_tensor_shape(config, longest)
        if getattr(batches[0], "pipeline_shapes", None) is not None:
            # Batches whose stages exchange something else (ULTRA-HSTU's channels, rows that
            # shrink after truncation) give each stage's shapes; the largest is declared.
            stage = parallel_state.get_pipeline_model_parallel_rank()
            recv = max((b.pipeline_shapes[stage][0] for b in batches), key=lambda shape: shape[0])
            send = max((b.pipeline_shapes[stage][1] for b in batches), key=lambda shape: shape[0])
        shapes["adjust_tensor_shapes_fn"] = lambda _recv, _send: ([recv], [send])
    return shapes
