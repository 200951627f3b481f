"""Retrieval head: cosine similarity between user states and item embeddings, a sampled
softmax for training and full-corpus ranks for evaluation."""

from __future__ import annotations

from typing import Optional

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
    corpus_ids: torch.Tensor,
    num_negatives: int,
    num_in_batch_negatives: int,
    temperature: float,
    generator: torch.Generator,
    batch_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token loss ``[T]`` of predicting ``labels`` from L2-normalised ``user`` ``[T, C]``.

    Negatives are shared by all tokens of the micro-batch: ``num_negatives`` uniform over
    the items of ``corpus_ids`` ``[num_items]`` and ``num_in_batch_negatives`` drawn from
    the labels of the whole micro-batch, ``batch_labels`` (frequency-weighted; default
    ``labels``: a context-parallel rank scores only its share of the tokens but draws the
    negatives every rank draws). A negative equal to a token's own label is masked out for
    that token.
    """
    device = labels.device
    pool = labels if batch_labels is None else batch_labels
    uniform = corpus_ids[torch.randint(0, corpus_ids.numel(), (num_negatives,), device=device, generator=generator)]
    picks = torch.randint(0, pool.numel(), (num_in_batch_negatives,), device=device, generator=generator)
    negative_ids = torch.cat([uniform, pool[picks]])  # [R]
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
