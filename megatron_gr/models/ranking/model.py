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
from megatron_gr.models.ranking.preprocessor import RankingPreprocessor
from megatron_gr.models.ranking.tower import MultiTaskTower, build_postprocessor, task_losses, task_scores
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.seeding import keyed_init
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

    The feature tables (``tables``: name -> table) and the preprocessor live on the first
    stage, the tower on the last; every module draws its initial values under its own key,
    so a stage builds only its own modules.
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
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        backend: KernelBackend = KernelBackend.PYTORCH,
        init_seed: Optional[int] = None,
    ):
        """``table_vocabularies``: every id of each table (in its keys), which evaluation
        reads once from sharded tables."""
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.ranking = ranking
        self.tasks = list(ranking.tasks)
        if pre_process and not tables:
            raise ValueError("the first pipeline stage needs the feature tables")
        self.tables = torch.nn.ModuleDict(tables) if pre_process else None
        self.table_vocabularies = table_vocabularies or {}
        self.token_group = pg_collection.tp if config.sequence_parallel else None
        if pre_process:
            with keyed_init(init_seed, "ranking", "preprocessor"):
                self.preprocessor = RankingPreprocessor(config, ranking, table_dims)
        spec = get_stu_block_spec(
            config, backend=backend, init_seed=init_seed, vp_stage=vp_stage, pp_rank=get_pg_rank(pg_collection.pp)
        )
        self.decoder = spec.module(
            config, spec, pre_process=pre_process, post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage
        )
        if post_process:
            with keyed_init(init_seed, "ranking", "tower"):
                self.postprocessor = build_postprocessor(ranking, config.hidden_size, config.layernorm_epsilon)
                self.tower = MultiTaskTower(ranking.tower, self.tasks, self.postprocessor.width, config.layernorm_epsilon)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> None:
        """No weight is shared between stages: the tables feed only the first."""
        return None

    def forward(self, batch: RankingBatch):
        tokens = TokenSplit.for_tokens(batch.num_tokens, self.token_group)
        params = tokens.seq_params(
            batch.offsets, batch.max_len, timestamps=batch.token_timestamps, num_targets=batch.num_targets
        )
        hidden = None
        if self.pre_process:
            hidden = tokens.scatter(self.preprocessor(batch, self.tables))
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, packed_seq_params=params)
        if not self.post_process:
            return hidden
        candidates = tokens.gather(hidden).squeeze(1)[batch.candidate_index]  # [N, C]
        outputs = self.tower(self.postprocessor(candidates, batch.candidate_timestamps))  # [N, tasks]
        if self.training:
            return task_losses(outputs, batch.labels, self.tasks)
        return CandidateScores(task_scores(outputs, self.tasks), batch.labels, batch.user_ids, batch.oracle)

    def evaluation_cache(self) -> ContextManager[None]:
        """Sharded (dynamic) tables read every id of their vocabulary once, so evaluation
        batches need no exchange between ranks (which may hold different numbers of them)."""
        if not self.pre_process:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for name, table in self.tables.items():
            if name in self.table_vocabularies:
                stack.enter_context(table.evaluation_cache(self.table_vocabularies[name].to(self.preprocessor_device())))
        return stack

    def preprocessor_device(self) -> torch.device:
        return next(self.preprocessor.parameters()).device
