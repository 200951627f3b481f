"""DLRM-HSTU's input preprocessor: a :class:`RankingBatch` -> the STU input ``[T, 1, C]``.

Per user the sequence is [contextual | history | candidates] (tzrec's contextual
preprocessor, without interleaving actions as separate tokens)::

    contextual token f = W_f e_f(x_f) + b_f                         one per contextual feature
    history token      = content_mlp(content(e(event))) + action_mlp(action(bits, watch))
                         + position(events back) + time(gap to query)
    candidate token    = content_mlp(content(e(candidate))) + action_mlp(a_candidate)
                         + position(0) + time(gap to query)

then dropout, keyed by the tokens (``megatron_gr/ops/keyed_dropout.py``: every layout drops
the same elements). ``e`` are the features' tables (a token's content is its features'
embeddings concatenated); without ``features.uih_action`` there is no action term.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.config.ranking_config import RankingConfig
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.data.ranking.batch import RankingBatch
from megatron_gr.models.ranking.encoders import ActionEncoder, ContentEncoder, PositionTimeEncoder, SimpleMLP
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout


class RankingPreprocessor(torch.nn.Module):
    def __init__(
        self,
        config: GRTransformerConfig,
        ranking: RankingConfig,
        table_dims: dict[str, int],
        *,
        backend: KernelBackend = KernelBackend.PYTORCH,
    ):
        """``table_dims``: the width of each table the features name; ``backend`` runs the
        dropout."""
        super().__init__()
        self.backend = backend
        features = ranking.features
        width = config.hidden_size
        self.embedding_dropout = config.embedding_dropout
        self.contextual_tables = tuple(features.contextual.values())
        self.history_tables = tuple(features.uih.values())
        self.candidate_tables = tuple(features.candidate.values())
        self.contextual_projections = torch.nn.ModuleList(
            torch.nn.Linear(table_dims[table], width) for table in self.contextual_tables
        )
        self.content_encoder = ContentEncoder(
            ranking.content_encoder,
            history_width=sum(table_dims[t] for t in self.history_tables),
            candidate_width=sum(table_dims[t] for t in self.candidate_tables),
        )
        self.content_mlp = SimpleMLP(self.content_encoder.dim, ranking.content_encoder.mlp_hidden, width)
        self.action_encoder = None
        if features.uih_action is not None:
            self.action_encoder = ActionEncoder(ranking.action_encoder, init_std=config.init_method_std)
            self.action_mlp = SimpleMLP(self.action_encoder.dim, ranking.action_encoder.mlp_hidden, width)
        self.encodings = PositionTimeEncoder(
            num_position_buckets=ranking.num_position_buckets,
            num_time_buckets=config.num_time_buckets,
            time_bucket_fn=config.time_bucket_fn,
            width=width,
            init_std=config.init_method_std,
        )

    def forward(
        self, batch: RankingBatch, tables: torch.nn.ModuleDict, dropout_keys: Optional[DropoutKeys] = None
    ) -> torch.Tensor:
        """``dropout_keys``: the embedding site's keys of every token (training)."""
        contextual = self.contextual_tokens(batch, tables)  # [B * C, width]
        history, candidates = self.item_tokens(batch, tables)  # [H, width], [N, width]
        tokens = torch.cat([contextual, history, candidates])
        order = torch.cat([batch.contextual_index, batch.history_index, batch.candidate_index])
        # tokens[i] belongs at position order[i]: gather by the inverse permutation.
        x = tokens[torch.argsort(order)]
        x = keyed_dropout(x, dropout_keys, p=self.embedding_dropout, training=self.training, kernel=self.backend)
        return x.unsqueeze(1)  # [T, 1, width]

    def contextual_tokens(self, batch: RankingBatch, tables: torch.nn.ModuleDict) -> torch.Tensor:
        """``[B * C, width]``, user-major (the order of ``contextual_index``)."""
        per_feature = [
            projection(tables[table](batch.contextual_ids[:, i]))
            for i, (table, projection) in enumerate(zip(self.contextual_tables, self.contextual_projections))
        ]
        if not per_feature:
            return self.content_mlp.fc2.weight.new_zeros(0, self.content_mlp.fc2.out_features)
        return torch.stack(per_feature, dim=1).reshape(-1, per_feature[0].shape[-1])

    def item_tokens(self, batch: RankingBatch, tables: torch.nn.ModuleDict) -> tuple[torch.Tensor, torch.Tensor]:
        history = torch.cat([tables[t](batch.history_ids[:, i]) for i, t in enumerate(self.history_tables)], dim=-1)
        candidates = torch.cat([tables[t](batch.candidate_ids[:, i]) for i, t in enumerate(self.candidate_tables)], dim=-1)
        history, candidates = self.content_encoder(history, candidates)
        history = self.content_mlp(history)
        candidates = self.content_mlp(candidates)
        if self.action_encoder is not None:
            history = history + self.action_mlp(self.action_encoder(batch.history_actions, batch.history_watchtimes))
            candidates = candidates + self.action_mlp(self.action_encoder.candidate_embedding)
        history = history + self.encodings(batch.history_positions, batch.history_gaps)
        candidates = candidates + self.encodings(torch.zeros_like(batch.candidate_gaps), batch.candidate_gaps)
        return history, candidates
