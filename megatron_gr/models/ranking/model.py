"""DLRM-HSTU ranking on megatron-core: feature tables -> preprocessor -> target-aware STU
stack -> per-candidate postprocessor, fusion MLP and task heads."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank

from megatron_gr.config.ranking_config import RankingConfig
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.data.ranking.batch import RankingBatch
from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.models.ranking.fusion_linear import fusion_linear
from megatron_gr.models.ranking.preprocessor import RankingPreprocessor
from megatron_gr.models.ranking.feature_tables import first_stage_tables, vocabulary_cache
from megatron_gr.models.ranking.tower import build_head, task_losses, task_scores
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.seeding import keyed_init
from megatron_gr.transformer.context_parallel import BatchShard
from megatron_gr.transformer.dropout_sites import EMBEDDING
from megatron_gr.transformer.sequence_parallel import TokenSplit
from megatron_gr.transformer.specs import get_stu_block_spec


@dataclass
class CandidateScores:
    """An evaluation micro-batch's output: one row per candidate."""

    scores: torch.Tensor  # [N, tasks] float32 probabilities (binary) or values (regression)
    labels: torch.Tensor  # [N, tasks] float32
    user_ids: torch.Tensor  # [N] int64
    oracle: Optional[torch.Tensor]  # [N, tasks] float64 planted probabilities, or None


class DLRMHSTUModel(MegatronModule):
    """Each user's sequence [contextual | history | candidates] runs through STU layers
    whose attention is target-aware: ``config.contextual_len`` contextual tokens are seen by
    every token, and each of the ``num_targets`` candidates at the end of a sequence sees
    the contextual tokens, the history and itself, never another candidate
    (``ops/attention_mask.py``). A candidate's output then goes through the postprocessor,
    the fusion MLP and one head per task.

    ``forward`` returns, on the last pipeline stage, the per-candidate weighted loss ``[N]``
    in training mode and :class:`CandidateScores` in eval mode; elsewhere the hidden states.
    Under context parallelism (:class:`BatchShard`) each rank computes its share of the
    tokens and returns the losses or scores of the candidates among them.

    The feature tables (``tables``: name -> table) and the preprocessor live on the first
    stage, the tower on the last; every module draws its initial values under its own key,
    so a stage builds only its own modules. Every dropout (inputs, STU layers, tower) is
    keyed by the batch's ``token_keys`` and ``dropout_seed``, which training batches carry.
    """

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
        """``table_vocabularies``: every id of each table (in its keys), which evaluation
        reads once from sharded tables; ``table_rows``: the rows of each plain table (on
        every stage: checkpoints record them)."""
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.ranking = ranking
        self.tasks = list(ranking.tasks)
        self.tables = first_stage_tables(tables, pre_process=pre_process)
        self.table_vocabularies = table_vocabularies or {}
        self.table_rows = dict(table_rows or {})
        # Sequence parallelism splits the tokens over the tensor-parallel group, context
        # parallelism the sequences over the context-parallel group.
        self.token_group = pg_collection.tp if config.sequence_parallel else None
        self.context_group = pg_collection.cp if config.context_parallel_size > 1 else None
        if pre_process:
            with keyed_init(init_seed, "ranking", "preprocessor"):
                self.preprocessor = RankingPreprocessor(config, ranking, table_dims, backend=backend)
        spec = get_stu_block_spec(
            config, backend=backend, init_seed=init_seed, vp_stage=vp_stage, pp_rank=get_pg_rank(pg_collection.pp)
        )
        self.decoder = spec.module(
            config, spec, pre_process=pre_process, post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage
        )
        if post_process:
            self.postprocessor, self.tower = build_head(
                ranking, self.tasks, config.hidden_size, config.layernorm_epsilon, num_layers=config.num_layers,
                backend=backend, init_seed=init_seed, linear=fusion_linear(config),
            )

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> None:
        """No weight is shared between stages: the tables feed only the first."""
        return None

    def forward(self, batch: RankingBatch):
        if self.training and batch.token_keys is None:
            raise ValueError("a training batch needs token_keys (RankingTrainingBatches draws them)")
        shard = self._shard(batch)
        tokens = TokenSplit.for_tokens(
            shard.num_tokens(batch.num_tokens), self.token_group, never_empty=self.context_group is not None
        )
        params = shard.seq_params(
            tokens, batch.offsets, batch.max_len, timestamps=batch.token_timestamps, num_targets=batch.num_targets,
            token_keys=batch.token_keys, dropout_seed=batch.dropout_seed,
        )
        hidden = None
        if self.pre_process:
            keys = self._keys(batch, batch.token_keys, EMBEDDING)
            hidden = tokens.scatter(shard.take(self.preprocessor(batch, self.tables, keys)))
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, packed_seq_params=params)
        if not self.post_process:
            return hidden
        rows, mine = self._local_candidates(batch, shard)
        pick = (lambda values: values) if mine is None else (lambda values: values[mine])  # noqa: E731
        candidates = tokens.gather(hidden).squeeze(1)[rows]  # [N, C]
        keys = None
        if batch.token_keys is not None:  # the tower's sites are its own; the keys are the candidates'
            keys = self._keys(batch, pick(batch.token_keys[batch.candidate_index]), EMBEDDING)
        outputs = self.tower(self.postprocessor(candidates, pick(batch.candidate_timestamps)), keys)  # [N, tasks]
        if self.training:
            return task_losses(outputs, pick(batch.labels), self.tasks)
        oracle = None if batch.oracle is None else pick(batch.oracle)
        return CandidateScores(task_scores(outputs, self.tasks), pick(batch.labels), pick(batch.user_ids), oracle)

    @staticmethod
    def _keys(batch: RankingBatch, token_keys: Optional[torch.Tensor], site: int) -> Optional[DropoutKeys]:
        return None if token_keys is None else DropoutKeys(seed=batch.dropout_seed, site=site, token_keys=token_keys)

    def _shard(self, batch: RankingBatch) -> BatchShard:
        """The tokens of ``batch`` this rank computes: all of them, or its context-parallel share."""
        return BatchShard.of_batch(batch, group=self.context_group, config=self.config)

    @staticmethod
    def _local_candidates(batch: RankingBatch, shard: BatchShard) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The rows of this rank's tokens that are candidates, and which candidates they are
        (None: all of them, in order). A split sequence's candidates (its tail) may lie on
        several context-parallel ranks."""
        if shard.token_index is None:
            return batch.candidate_index, None
        owner = torch.full((batch.num_tokens,), -1, dtype=torch.int64, device=batch.candidate_index.device)
        owner[batch.candidate_index] = torch.arange(batch.num_candidates, device=owner.device)
        local = owner[shard.token_index]
        rows = torch.nonzero(local >= 0).squeeze(1)
        return rows, local[rows]

    def evaluation_cache(self) -> ContextManager[None]:
        """Sharded (dynamic) tables read every id of their vocabulary once, so evaluation
        batches need no exchange between ranks (which may hold different numbers of them)."""
        if not self.pre_process:
            return contextlib.nullcontext()
        return vocabulary_cache(self.tables, self.table_vocabularies, self.preprocessor_device())

    def preprocessor_device(self) -> torch.device:
        return next(self.preprocessor.parameters()).device
