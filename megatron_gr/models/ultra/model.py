"""ULTRA-HSTU on the DLRM-HSTU ranking model: a mixture of transducers (one STU stack per
behaviour channel, each with its own depth, width, semi-local attention and attention
truncation) whose candidate outputs are concatenated before DLRM-HSTU's postprocessor,
fusion MLP and task heads.

Per channel the sequence is [contextual | channel history | candidates] and runs through
DLRM-HSTU's preprocessor (at the channel's width, over its own groups) and target-aware
STU layers (``transformer/ultra_layers.py``: truncation hook, rematerialization). The
feature tables are shared. One unnamed channel builds the modules of
:class:`DLRMHSTUModel` under the same keys and computes what it computes.

Pipeline stages hold an equal share of every channel's layers and exchange the channels'
activations as one flat tensor ``[sum of rows x widths, 1, 1]`` (:func:`stage_rows`: rows
shrink after a channel's split layer; with hyper-connections a row carries n streams).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import ContextManager, Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_gr.config.ranking_config import RankingConfig
from megatron_gr.config.transducer_config import TransducerConfig
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.config.ultra_checks import channel_features, channels_of
from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.ranking.batch import RankingBatch
from megatron_gr.data.ranking.channel_batches import ChannelBatch
from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.models.ranking.model import CandidateScores
from megatron_gr.models.ranking.fusion_linear import fusion_linear
from megatron_gr.models.ranking.preprocessor import RankingPreprocessor
from megatron_gr.models.ranking.feature_tables import first_stage_tables, vocabulary_cache
from megatron_gr.models.ranking.tower import build_head, task_losses, task_scores
from megatron_gr.models.ultra.streams import ChannelStreams
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.seeding import derive_seed, keyed_init
from megatron_gr.transformer.attn_truncation import TruncationPlan, attach, plan_truncation
from megatron_gr.transformer.dropout_sites import EMBEDDING
from megatron_gr.transformer.sequence_parallel import TokenSplit
from megatron_gr.transformer.ultra_layers import get_ultra_block_spec

UNNAMED = "uih"  # module and batch key of the single unnamed channel (a reserved name)


def channel_key(transducer: TransducerConfig) -> str:
    return transducer.name or UNNAMED


def channel_config(config: GRTransformerConfig, transducer: TransducerConfig) -> GRTransformerConfig:
    """The model config with the channel's own depth, width, attention and truncation."""
    return dataclasses.replace(config, transducers=None, **transducer.overrides())


def channel_configs(config: GRTransformerConfig) -> dict[str, GRTransformerConfig]:
    return {channel_key(t): channel_config(config, t) for t in channels_of(config)}


@dataclass
class ChannelRun:
    """One channel's layout of one micro-batch."""

    tokens: TokenSplit
    params: object  # JaggedSeqParams
    plan: Optional[TruncationPlan]

    def split_after(self, layers_done: int) -> TokenSplit:
        """How the tokens are split once ``layers_done`` layers have run."""
        if self.plan is not None and self.plan.split_layer < layers_done:
            return self.plan.after
        return self.tokens


def stage_rows(split: TokenSplit) -> int:
    """Rows of this rank's activation for tokens laid out as ``split``."""
    rows = split.num_tokens + split.padding
    return rows // split.group.size() if split.group is not None else rows


def stream_width(config: GRTransformerConfig) -> int:
    return config.hidden_size * (config.num_residual_streams if config.enable_hyper_connections else 1)


class TransducerChannel(MegatronModule):
    """One channel on one pipeline stage: its preprocessor (first stage) and its STU layers."""

    def __init__(self, config: GRTransformerConfig, ranking: RankingConfig, table_dims: dict[str, int], *,
                 init_key: tuple, pre_process: bool, post_process: bool, pg_collection, vp_stage, backend, init_seed):
        super().__init__(config)
        if pre_process:
            with keyed_init(init_seed, *init_key, "preprocessor"):
                self.preprocessor = RankingPreprocessor(config, ranking, table_dims, backend=backend)
        layers_seed = init_seed if not init_key[1:] or init_seed is None else derive_seed(init_seed, *init_key)
        spec = get_ultra_block_spec(
            config, backend=backend, init_seed=layers_seed, vp_stage=vp_stage, pp_rank=get_pg_rank(pg_collection.pp)
        )
        self.decoder = spec.module(
            config, spec, pre_process=pre_process, post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage
        )


class ChannelStacks(MegatronModule):
    """The channels by key. A MegatronModule (not a ModuleDict) so that checkpoints reach
    each channel's block, which maps its layers to global numbers across pipeline stages."""

    def __init__(self, config: GRTransformerConfig, channels: dict[str, TransducerChannel]):
        super().__init__(config)
        for key, channel in channels.items():
            self.add_module(key, channel)

    def items(self):
        return self.named_children()

    def __iter__(self):
        return (key for key, _ in self.named_children())

    def __getitem__(self, key: str) -> TransducerChannel:
        return self.get_submodule(key)


class UltraHSTUModel(MegatronModule):
    """``forward`` takes a :class:`ChannelBatch` and returns, on the last pipeline stage, the
    per-candidate weighted loss ``[N]`` (training) or :class:`CandidateScores` (eval); on
    other stages the channels' activations, flat."""

    share_embeddings_and_output_weights = False

    def __init__(
        self,
        config: GRTransformerConfig,
        ranking: RankingConfig,
        tables: Optional[dict[str, EmbeddingTable]],
        *,
        table_dims: dict[str, int],
        table_vocabularies: Optional[dict[str, torch.Tensor]] = None,
        table_rows: Optional[dict[str, int]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        backend: KernelBackend = KernelBackend.PYTORCH,
        init_seed: Optional[int] = None,
    ):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.tasks = list(ranking.tasks)
        self.tables = first_stage_tables(tables, pre_process=pre_process)
        self.table_vocabularies = table_vocabularies or {}
        self.table_rows = dict(table_rows or {})  # plain tables' rows, on every stage (checkpoints record them)
        self.token_group = pg_collection.tp if config.sequence_parallel else None
        self.pp_rank, self.pp_size = get_pg_rank(pg_collection.pp), get_pg_size(pg_collection.pp)
        self.channel_configs = channel_configs(config)
        channels = {}
        for transducer in channels_of(config):
            key = channel_key(transducer)
            view = dataclasses.replace(ranking, features=channel_features(ranking.features, transducer.name))
            # The unnamed channel draws under DLRM-HSTU's keys: the same initial weights.
            init_key = ("ranking",) if not transducer.name else ("ranking", "channel", transducer.name)
            channels[key] = TransducerChannel(
                self.channel_configs[key], view, table_dims, init_key=init_key, pre_process=pre_process,
                post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage, backend=backend,
                init_seed=init_seed,
            )
        self.channels = ChannelStacks(config, channels)
        if post_process:
            self.postprocessor, self.tower = build_head(
                ranking, self.tasks, sum(c.hidden_size for c in self.channel_configs.values()),
                config.layernorm_epsilon, num_layers=max(c.num_layers for c in self.channel_configs.values()),
                backend=backend, init_seed=init_seed, linear=fusion_linear(config),
            )
        self.streams = ChannelStreams()
        self.input_tensor = None

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def shared_embedding_or_output_weight(self) -> None:
        return None

    def forward(self, batch: ChannelBatch):
        if self.training and batch.first.token_keys is None:
            raise ValueError("a training batch needs token_keys (ChannelTrainingBatches draws them)")
        check_candidate_counts(batch)
        kept = batch.kept_tokens or {}
        runs = {key: self.channel_run(key, batch.channels[key], batch.max_candidates, kept.get(key)) for key in self.channels}
        inputs = self._stage_inputs(batch, runs)
        decoders = [
            partial(channel.decoder, hidden_states=inputs[key], attention_mask=None, packed_seq_params=runs[key].params)
            for key, channel in self.channels.items()
        ]
        outputs = dict(zip(self.channels, self.streams.run(decoders, batch.first.offsets.device)))
        if not self.post_process:
            return torch.cat([out.reshape(-1, 1, 1) for out in outputs.values()])
        candidates = torch.cat(
            [self._candidate_rows(runs[key], outputs[key], batch.channels[key]) for key in self.channels], dim=-1
        )  # [N, sum of channel widths]
        first = batch.first
        keys = None  # the tower's sites are its own; the keys are the candidates' (of the first channel)
        if first.token_keys is not None:
            keys = DropoutKeys(seed=first.dropout_seed, site=EMBEDDING, token_keys=first.token_keys[first.candidate_index])
        scores = self.tower(self.postprocessor(candidates, first.candidate_timestamps), keys)  # [N, tasks]
        if self.training:
            return task_losses(scores, first.labels, self.tasks)
        return CandidateScores(task_scores(scores, self.tasks), first.labels, first.user_ids, first.oracle)

    def channel_run(self, key: str, batch: RankingBatch, max_candidates: int, num_kept: Optional[int] = None) -> ChannelRun:
        """``num_kept``: the channel's tokens after truncation, when the loader counted them."""
        config = self.channel_configs[key]
        tokens = TokenSplit.for_tokens(batch.num_tokens, self.token_group)
        params = tokens.seq_params(batch.offsets, batch.max_len, timestamps=batch.token_timestamps,
                                   num_targets=batch.num_targets, token_keys=batch.token_keys,
                                   dropout_seed=batch.dropout_seed)
        plan = None
        if config.attn_truncation_split_layer:
            plan = plan_truncation(
                params, tokens, contextual_len=config.contextual_len, tail_len=config.attn_truncation_tail_len,
                split_layer=config.attn_truncation_split_layer, max_targets=max_candidates, num_kept=num_kept,
            )
        return ChannelRun(tokens, attach(params, plan), plan)

    def _stage_inputs(self, batch: ChannelBatch, runs: dict[str, ChannelRun]) -> dict:
        if self.pre_process:
            return {
                key: runs[key].tokens.scatter(channel.preprocessor(batch.channels[key], self.tables, _keys(batch.channels[key])))
                for key, channel in self.channels.items()
            }
        sizes, shapes = [], []
        for key in self.channels:
            config = self.channel_configs[key]
            rows = stage_rows(runs[key].split_after(self.pp_rank * (config.num_layers // self.pp_size)))
            shapes.append((rows, 1, stream_width(config)))
            sizes.append(rows * stream_width(config))
        pieces = torch.split(self.input_tensor.reshape(-1), sizes)
        for (key, channel), piece, shape in zip(self.channels.items(), pieces, shapes):
            channel.decoder.set_input_tensor(piece.view(shape))
        return dict.fromkeys(self.channels)

    def _candidate_rows(self, run: ChannelRun, hidden: torch.Tensor, batch: RankingBatch) -> torch.Tensor:
        """``[N, width]`` the channel's output at each candidate (after its truncation)."""
        if run.plan is None:
            return run.tokens.gather(hidden).squeeze(1)[batch.candidate_index]
        return run.plan.after.gather(hidden).squeeze(1)[run.plan.new_position[batch.candidate_index]]

    def evaluation_cache(self) -> ContextManager[None]:
        """As DLRM-HSTU: sharded tables read their whole vocabulary once."""
        if not self.pre_process:
            return contextlib.nullcontext()
        device = next(self.channels[next(iter(self.channels))].preprocessor.parameters()).device
        return vocabulary_cache(self.tables, self.table_vocabularies, device)


def _keys(batch: RankingBatch) -> Optional[DropoutKeys]:
    """The embedding site's dropout keys of the channel's tokens (training)."""
    if batch.token_keys is None:
        return None
    return DropoutKeys(seed=batch.dropout_seed, site=EMBEDDING, token_keys=batch.token_keys)


def check_candidate_counts(batch: ChannelBatch) -> None:
    """Every channel scores the same candidates (one row each)."""
    counts = {key: b.num_candidates for key, b in batch.channels.items()}
    first = next(iter(counts.values()))
    if any(count != first for count in counts.values()):  # not a set: traced sizes are not hashable
        listed = ", ".join(f"{key}: {count}" for key, count in counts.items())
        raise DataFormatError(
            f"the channels of a micro-batch hold different numbers of candidate rows ({listed}): every channel "
            "must read the same candidates of the same samples"
        )
