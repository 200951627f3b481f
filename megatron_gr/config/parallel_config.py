"""How a run is spread over ranks: tensor, sequence, context, pipeline and data parallelism.

The data-parallel size is not set: it is the world size divided by tensor x context x
pipeline size. The model's megatron fields (``tensor_model_parallel_size``,
``pipeline_model_parallel_size``, ``sequence_parallel``, ``context_parallel_size``) are
filled from this section when the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_gr.config.validation import check_choice, check_int_range, require

MICRO_BATCH_BALANCE = ("auto", "attention_cost", "none")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Ranks that split every STU layer: attention heads (the UVQK projection is
    column-parallel, the output projection row-parallel). Must divide the number of heads."""

    pipeline_model_parallel_size: int = 1
    """Pipeline stages; each holds num_layers / stages consecutive layers (megatron's 1F1B
    schedule; no virtual stages). The first stage also embeds the inputs, the last one
    computes the loss and the ranks."""

    sequence_parallel: bool = False
    """Split the packed tokens of a batch over the tensor-parallel ranks outside attention
    (layer norms, residuals, dropout): less activation memory. Needs tensor parallelism."""

    context_parallel_size: int = 1
    """Ranks that split the sequences of every micro-batch (context parallelism): each holds
    part of the tokens, and attention fetches the keys of the others. For histories whose
    activations do not fit one GPU. The ranks of a group read the same micro-batches (they
    are not data-parallel ranks) and hold the same weights."""

    context_parallel_split_threshold: int = 1024
    """Context parallelism: sequences longer than this many tokens are cut into 2 x
    context_parallel_size chunks, rank i holding chunks i and 2 x size - 1 - i (each rank
    gets an early, cheap chunk and a late, expensive one under the causal mask); shorter
    sequences stay whole on the rank with the least attention cost (sum of squared
    lengths). At least 2 x context_parallel_size (every chunk a token or more)."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state and fp32 main weights over data- and context-parallel ranks
    (megatron's DistributedOptimizer; gradients are reduce-scattered, weights all-gathered);
    with one such rank the shard is everything. Its checkpoints load under any layout with
    this setting on; megatron's other optimizers store their state differently, so a
    checkpoint loads only into a run with the same setting."""

    overlap_grad_reduce: Optional[bool] = None
    """Reduce gradients bucket by bucket while the backward pass runs. None: on for GPU runs
    with more than one data- or context-parallel rank."""

    overlap_param_gather: Optional[bool] = None
    """With the distributed optimizer, all-gather updated weights during the next forward
    pass instead of right after the optimizer step. None: on for GPU runs with more than one
    data- or context-parallel rank."""

    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient-reduction bucket; smaller buckets start reducing earlier in
    the backward pass. None: megatron's default (max(4e7, 1e6 x data-parallel size), one
    bucket for most recommendation models)."""

    micro_batch_balance: Literal["auto", "attention_cost", "none"] = "auto"
    """How the users of a global batch are grouped into micro-batches (and so spread over
    data-parallel ranks): ``attention_cost`` equalises the sum of squared sequence lengths
    of the micro-batches, ``none`` cuts the shuffled stream in order. ``auto``:
    ``attention_cost`` with more than one data-parallel rank (no rank waits for the long
    histories), ``none`` on one. The cut does not change the objective: negatives are drawn
    per global batch and dropout masks are keyed by sample and position, so only the order
    of floating-point sums differs between cuts."""

    def __post_init__(self):
        check_int_range("tensor_model_parallel_size", self.tensor_model_parallel_size, low=1)
        check_int_range("pipeline_model_parallel_size", self.pipeline_model_parallel_size, low=1)
        check_int_range("context_parallel_size", self.context_parallel_size, low=1)
        check_int_range("context_parallel_split_threshold", self.context_parallel_split_threshold, low=1)
        require(
            self.context_parallel_split_threshold >= 2 * self.context_parallel_size,
            f"context_parallel_split_threshold={self.context_parallel_split_threshold} is shorter than the "
            f"2 x context_parallel_size = {2 * self.context_parallel_size} chunks a split sequence is cut into: "
            f"set it to {2 * self.context_parallel_size} or more",
        )
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "sequence_parallel=true splits tokens over tensor-parallel ranks and needs "
            f"tensor_model_parallel_size > 1 (got {self.tensor_model_parallel_size}): set "
            "--tensor-model-parallel-size 2 or more, or drop --sequence-parallel",
        )
        if self.ddp_bucket_size is not None:
            check_int_range("ddp_bucket_size", self.ddp_bucket_size, low=1)
        check_choice("micro_batch_balance", self.micro_batch_balance, MICRO_BATCH_BALANCE)

    @property
    def model_parallel_size(self) -> int:
        """Ranks of one model replica that read the same micro-batches: tensor x context x
        pipeline."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that read different micro-batches; raises ConfigError when ``world_size``
        does not split into whole tensor x context x pipeline groups."""
        require(
            world_size % self.model_parallel_size == 0,
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"context_parallel_size x pipeline_model_parallel_size = {self.tensor_model_parallel_size} x "
            f"{self.context_parallel_size} x {self.pipeline_model_parallel_size}: launch a multiple of "
            f"{self.model_parallel_size} processes or change the parallel sizes",
        )
        return world_size // self.model_parallel_size

    def balance_for(self, data_parallel_size: int) -> str:
        """The micro-batch grouping in effect: ``attention_cost`` or ``none``."""
        if self.micro_batch_balance == "auto":
            return "attention_cost" if data_parallel_size > 1 else "none"
        return self.micro_batch_balance
