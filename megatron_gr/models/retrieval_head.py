"""Retrieval head: similarity between user states and item embeddings (cosine, or the raw
dot product without L2 normalisation), a sampled or full softmax for training and
full-corpus ranks for evaluation."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from megatron_gr.embeddings.base import EmbeddingTable

CORPUS_CHUNK = 65536


def item_vectors(table: EmbeddingTable, ids: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """The rows of ``ids`` as :func:`scored_rows` makes them."""
    return scored_rows(table(ids), normalize=normalize)


def scored_rows(rows: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Item rows at least float32 (bf16 tables are scored in float32), unit-length when
    ``normalize`` (cosine scores)."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    return F.normalize(rows, dim=-1) if normalize else rows


def sampled_softmax_loss(
    user: torch.Tensor,
    labels: torch.Tensor,
    label_rows: torch.Tensor,
    *,
    negative_ids: torch.Tensor,
    negative_rows: torch.Tensor,
    temperature: float,
    normalize_items: bool = True,
) -> torch.Tensor:
    """Per-token loss ``[T]`` of predicting ``labels`` from ``user`` ``[T, C]`` (L2-normalised
    by the caller when ``normalize_items``: cosine scores) against ``negative_ids`` ``[R]``,
    shared by every token (the training loader draws them once per global batch:
    ``TrainingBatches``). A negative equal to a token's own label is masked out for that
    token. ``label_rows`` ``[T, C]`` and ``negative_rows`` ``[R, C]``: the item table's rows
    of those ids (the caller looks them up, together with the inputs' rows).
    """
    positive = (user * scored_rows(label_rows, normalize=normalize_items)).sum(-1, keepdim=True)  # [T, 1]
    negative = user @ scored_rows(negative_rows, normalize=normalize_items).t()  # [T, R]
    negative = negative.masked_fill(negative_ids.unsqueeze(0) == labels.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def full_softmax_loss(
    user: torch.Tensor,
    labels: torch.Tensor,
    label_rows: torch.Tensor,
    *,
    corpus_ids: torch.Tensor,
    corpus_rows: torch.Tensor,
    temperature: float,
    normalize_items: bool = True,
) -> torch.Tensor:
    """Per-token cross-entropy ``[T]`` of ``labels`` against every item of ``corpus_ids``:
    the exact softmax over the corpus (each label counted once), no sampling. Scores are
    ``[T, num_items]``: for small corpora. ``label_rows`` and ``corpus_rows``: the item
    table's rows of those ids."""
    positive = (user * scored_rows(label_rows, normalize=normalize_items)).sum(-1, keepdim=True)  # [T, 1]
    others = user @ scored_rows(corpus_rows, normalize=normalize_items).t()  # [T, num_items]
    others = others.masked_fill(corpus_ids.unsqueeze(0) == labels.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, others], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


@torch.no_grad()
def full_corpus_ranks(
    user: torch.Tensor,
    targets: torch.Tensor,
    table: EmbeddingTable,
    *,
    corpus_ids: torch.Tensor,
    normalize_items: bool = True,
) -> torch.Tensor:
    """0-based rank of each target among all items of ``corpus_ids`` ``[B]``: the number of
    other items scored at least as high. Items the user has seen are not removed.

    Pessimistic, so that a model cannot score by saying nothing:

    - ties count against the target (a model scoring every item alike ranks every target
      last, ``num_items - 1``, instead of first);
    - a NaN score counts as -inf, for the target and every other item: a NaN target ranks
      below every item with a number and ties with (so is beaten by) every other NaN; a NaN
      item never beats a target with a number. All-NaN scores rank every target last.
    """
    target = item_vectors(table, targets, normalize=normalize_items)
    target_score = _nan_as_lowest((user * target).sum(-1, keepdim=True))  # [B, 1]
    ranks = torch.zeros(targets.shape[0], dtype=torch.int64, device=targets.device)
    for ids in corpus_ids.split(CORPUS_CHUNK):
        scores = _nan_as_lowest(user @ item_vectors(table, ids, normalize=normalize_items).t())  # [B, chunk]
        beaten = (scores >= target_score) & (ids.unsqueeze(0) != targets.unsqueeze(1))
        ranks += beaten.sum(dim=1)
    return ranks


def _nan_as_lowest(scores: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(torch.isnan(scores), float("-inf"))
