"""Context parallelism: the sequences of a jagged micro-batch split over ranks, attention
across them. :func:`plan_context_split` decides each rank's tokens, :class:`BatchShard` is a
rank's view of a micro-batch for the model, :class:`ContextAttention` the attention of its
queries against the keys of every rank."""

from megatron_gr.transformer.context_parallel.attention import ContextAttention
from megatron_gr.transformer.context_parallel.shard import BatchShard
from megatron_gr.transformer.context_parallel.split import ContextSplit, plan_context_split

__all__ = ["BatchShard", "ContextAttention", "ContextSplit", "plan_context_split"]
