"""Sampled-softmax loss and full-corpus ranks against values computed by hand."""

from __future__ import annotations

import math

import torch

from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.models.retrieval_head import full_corpus_ranks, sampled_softmax_loss


class FixedTable(EmbeddingTable):
    """A lookup over given rows (row 0 = padding)."""

    def __init__(self, rows):
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.tensor(rows, dtype=torch.float64))
        self.dim = self.weight.shape[1]

    def forward(self, ids):
        return self.weight[ids]


# item 1 = x axis, 2 = y axis, 3 = (x + y)/sqrt2 direction (unnormalised: scaled by 5)
TABLE = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]


def test_sampled_softmax_by_hand():
    table = FixedTable(TABLE)
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # already unit vectors
    labels = torch.tensor([1, 3])
    temperature = 0.5
    negatives = [2, 1, 3, 2]  # repeats count twice; a token's own label is masked out
    loss = sampled_softmax_loss(user, labels, table, negative_ids=torch.tensor(negatives), temperature=temperature)
    cos = {  # cosine(user row, item) by hand
        (0, 1): 1.0, (0, 2): 0.0, (0, 3): 1 / math.sqrt(2),
        (1, 1): 0.0, (1, 2): 1.0, (1, 3): 1 / math.sqrt(2),
    }
    expected = []
    for t, label in enumerate(labels.tolist()):
        logits = [cos[(t, label)] / temperature]
        logits += [cos[(t, n)] / temperature for n in negatives if n != label]
        expected.append(math.log(sum(math.exp(x) for x in logits)) - logits[0])
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_loss_gradient_reaches_the_table():
    table = FixedTable(TABLE)
    user = torch.nn.functional.normalize(torch.tensor([[0.3, 0.7]], dtype=torch.float64), dim=-1)
    loss = sampled_softmax_loss(user, torch.tensor([2]), table, negative_ids=torch.tensor([1, 3, 3]), temperature=0.1)
    loss.sum().backward()
    assert table.weight.grad[2].abs().sum() > 0 and table.weight.grad[3].abs().sum() > 0
    assert table.weight.grad[0].abs().sum() == 0  # not a label, not a negative


def test_full_corpus_ranks_by_hand():
    table = FixedTable(TABLE)
    user = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64), dim=-1)
    # user 0 scores: item1 .995, item3 .77, item2 .0995 -> target 3 has rank 1
    # user 1 scores: item2 1, item3 .707, item1 0 -> target 1 has rank 2
    # user 2 scores: item3 1, item1 = item2 = .707 -> target 3 has rank 0
    ranks = full_corpus_ranks(user, torch.tensor([3, 1, 3]), table, corpus_ids=torch.arange(1, 4))
    assert ranks.tolist() == [1, 2, 0]
