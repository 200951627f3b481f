"""Retrieval head: cosine similarity between user states and item embeddings, a sampled
softmax for training and full-corpus ranks for evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_gr.embeddings.base import EmbeddingTable

CORPUS_CHUNK = 65536


def normalized(table: EmbeddingTable, ids: torch.Tensor) -> torch.Tensor:
    """Unit-length rows, at least float32 (bf16 tables are scored in float32)."""
    rows = table(ids)
    return F.normalize(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)


def sampled_softmax_loss(
    user: torch.Tensor,
    labels: torch.Tensor,
    table: EmbeddingTable,
    *,
    negative_ids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-token loss ``[T]`` of predicting ``labels`` from L2-normalised ``user`` ``[T, C]``
    against ``negative_ids`` ``[R]``, shared by every token (the training loader draws them
    once per global batch: ``TrainingBatches``). A negative equal to a token's own label is
    masked out for that token.
    """
    positive = (user * normalized(table, labels)).sum(-1, keepdim=True)  # [T, 1]
    negative = user @ normalized(table, negative_ids).t()  # [T, R]
    negative = negative.masked_fill(negative_ids.unsqueeze(0) == labels.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


@torch.no_grad()
def full_corpus_ranks(user: torch.Tensor, targets: torch.Tensor, table: EmbeddingTable, *, corpus_ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items of ``corpus_ids`` ``[B]``: the number of
    other items scored strictly higher. Items the user has seen are not removed."""
    target_score = (user * normalized(table, targets)).sum(-1, keepdim=True)  # [B, 1]
    ranks = torch.zeros(targets.shape[0], dtype=torch.int64, device=targets.device)
    for ids in corpus_ids.split(CORPUS_CHUNK):
        scores = user @ normalized(table, ids).t()  # [B, chunk]
        higher = (scores > target_score) & (ids.unsqueeze(0) != targets.unsqueeze(1))
        ranks += higher.sum(dim=1)
    return ranks
