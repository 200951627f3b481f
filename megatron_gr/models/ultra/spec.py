"""ULTRA-HSTU's part of the ``ranking`` TrainSpec (picked when ``model.uses_transducers``):
the channels' data, the stage builder, the channel micro-batch streams. Losses, evaluation
statistics and metrics are DLRM-HSTU's (``models/ranking/spec.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

from megatron.core import parallel_state

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.ultra_checks import channel_features, channels_of
from megatron_gr.data.loader import PARTITIONS
from megatron_gr.data.ranking.channel_batches import (
    Channel,
    ChannelBatch,
    ChannelTrainingBatches,
    channel_evaluation_batches,
)
from megatron_gr.data.ranking.channels import event_stores, index_channels
from megatron_gr.data.ranking.indexed import TaskLabel
from megatron_gr.data.ranking.loader import SequenceLayout
from megatron_gr.data.ranking.source import resolve_ranking_source
from megatron_gr.embeddings.builder import build_table
from megatron_gr.models.ranking.spec import RankingDataset, _read_samples
from megatron_gr.models.registry import StageRequest
from megatron_gr.models.ultra.model import UltraHSTUModel, channel_configs, channel_key, stream_width
from megatron_gr.transformer.attn_truncation import kept_count


@dataclass
class UltraDataset(RankingDataset):
    channels: dict[str, Channel] = None

    def table_rows(self) -> dict[str, int]:
        rows = {}
        for channel in self.channels.values():
            rows.update({name: space.num_items + 1 for name, space in channel.data.tables.items()})
        return rows

    def vocabulary(self, table: str):
        return next(c.data for c in self.channels.values() if table in c.data.tables).tables[table].corpus()

    def describe(self) -> str:
        histories = ", ".join(
            f"{key}: {channel.data.samples.history_lengths.mean():.1f}" for key, channel in self.channels.items()
        )
        return super().describe() + f"; events per history by channel: {histories}"


def build_dataset(config) -> UltraDataset:
    samples, source = _read_samples(config)
    for which in ("train", "valid", "test"):
        if samples.count(which) == 0:
            raise ConfigError(f"the {source} data has no {which} requests: users need at least 3 requests")
    ranking = config.ranking
    tasks = [TaskLabel(t.name, t.label, t.bitmask if t.type == "binary" else None) for t in ranking.tasks]
    raw_keyed = {name for name, table in config.embeddings.items() if table.keyed_by_raw_ids}
    transducers = channels_of(config.model)
    indexed = index_channels(
        samples, event_stores(samples, resolve_ranking_source(config.data.source, config.data.path)),
        {channel_key(t): channel_features(ranking.features, t.name) for t in transducers},
        tasks=tasks, raw_keyed_tables=raw_keyed, source=source,
    )
    channels = {}
    for key, data in indexed.items():
        try:
            layout = SequenceLayout(data, max_seq_len=config.model.max_seq_len, use_history=ranking.use_history)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        channels[key] = Channel(data, layout)
    first = next(iter(channels.values()))
    return UltraDataset(first.data, first.layout, source, channels)


def _channel_tables(config) -> list[str]:
    features = config.ranking.features
    names = []
    for transducer in channels_of(config.model):
        view = channel_features(features, transducer.name)
        names += [t for group in (view.contextual, view.uih, view.candidate) for t in group.values()]
    return list(dict.fromkeys(names))


def build_stage(request: StageRequest) -> UltraHSTUModel:
    plan, dataset = request.plan, request.dataset
    config = plan.config
    names = _channel_tables(config)
    rows = dataset.table_rows()
    tables = None
    if request.pre_process:
        tables = {
            name: build_table(
                name, config.embeddings[name], plan.model_config, num_embeddings=rows[name], seed=plan.seed,
                device=plan.device, backend=plan.backend,
                shard_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            )
            for name in names
        }
    vocabularies = {name: dataset.vocabulary(name) for name in names if config.embeddings[name].keyed_by_raw_ids}
    return UltraHSTUModel(
        plan.model_config, config.ranking, tables, table_dims={name: config.embeddings[name].dim for name in names},
        table_vocabularies=vocabularies,
        table_rows={name: config.embeddings[name].num_embeddings or rows[name] for name in names
                    if config.embeddings[name].type == "plain"},
        pre_process=request.pre_process, post_process=request.post_process,
        backend=plan.backend, init_seed=plan.seed,
    )


def training_stream(plan, dataset: UltraDataset, dp_rank: int, dp_size: int):
    return ChannelTrainingBatches(
        dataset.channels, micro_batch_size=plan.config.training.micro_batch_size,
        num_micro_batches=plan.micro_batches_per_rank, seed=plan.seed, dp_rank=dp_rank, dp_size=dp_size,
        partition_fn=PARTITIONS[plan.micro_batch_balance], finish=partial(with_host_counts, config=plan.model_config),
    )


def evaluation_stream(plan, dataset: UltraDataset, which: str, dp_rank: int, dp_size: int) -> Iterator[ChannelBatch]:
    for batch in channel_evaluation_batches(
        dataset.channels, which, batch_size=plan.config.training.eval_batch_size, dp_rank=dp_rank, dp_size=dp_size
    ):
        yield with_host_counts(batch, plan.model_config)


def with_host_counts(batch: ChannelBatch, config) -> ChannelBatch:
    """What the loader counts on the host for the model: the tokens each truncating channel
    keeps (``batch.kept_tokens``) and the pipeline stages' activation shapes."""
    kept = {}
    for key, channel in channel_configs(config).items():
        if channel.attn_truncation_split_layer:
            b = batch.channels[key]
            kept[key] = kept_count((b.offsets[1:] - b.offsets[:-1]).numpy(), b.num_targets.numpy(),
                                   contextual_len=channel.contextual_len, tail_len=channel.attn_truncation_tail_len)
    batch.kept_tokens = kept
    return with_pipeline_shapes(batch, config)


def with_pipeline_shapes(batch: ChannelBatch, config) -> ChannelBatch:
    """Fills ``batch.pipeline_shapes``: per stage, the flat activation it receives and sends
    (rows of every channel on this rank x their widths; rows shrink after a split layer)."""
    pp = config.pipeline_model_parallel_size
    if pp == 1:
        return batch
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    boundaries = []  # elements after 0, 1, ..., pp stages' layers
    for stage in range(pp + 1):
        total = 0
        for key, channel in channel_configs(config).items():
            b = batch.channels[key]
            tokens = b.num_tokens
            if channel.attn_truncation_split_layer and channel.attn_truncation_split_layer < stage * channel.num_layers // pp:
                lengths = (b.offsets[1:] - b.offsets[:-1]).numpy()
                tokens = kept_count(lengths, b.num_targets.numpy(), contextual_len=channel.contextual_len,
                                    tail_len=channel.attn_truncation_tail_len)
            total += -(-tokens // tp) * stream_width(channel)
        boundaries.append((total, 1, 1))
    batch.pipeline_shapes = [(boundaries[s], boundaries[s + 1]) for s in range(pp)]
    return batch
