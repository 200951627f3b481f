"""Sampled-softmax loss and full-corpus ranks against values computed by hand."""

from __future__ import annotations

import math

import torch

from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.models.retrieval_head import full_corpus_ranks, full_softmax_loss, sampled_softmax_loss


class FixedTable(EmbeddingTable):
    """A lookup over given rows (row 0 = padding)."""

    def __init__(self, rows):
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.tensor(rows, dtype=torch.float64))
        self.dim = self.weight.shape[1]

    def forward(self, ids):
        return self.weight[ids]


def _sampled(user, labels, table, negatives, **kwargs):
    return sampled_softmax_loss(user, labels, table(labels), negative_ids=negatives, negative_rows=table(negatives), **kwargs)


def _full(user, labels, table, corpus, **kwargs):
    return full_softmax_loss(user, labels, table(labels), corpus_ids=corpus, corpus_rows=table(corpus), **kwargs)


# item 1 = x axis, 2 = y axis, 3 = (x + y)/sqrt2 direction (unnormalised: scaled by 5)
TABLE = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]


def test_sampled_softmax_by_hand():
    table = FixedTable(TABLE)
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # already unit vectors
    labels = torch.tensor([1, 3])
    temperature = 0.5
    negatives = [2, 1, 3, 2]  # repeats count twice; a token's own label is masked out
    loss = _sampled(user, labels, table, torch.tensor(negatives), temperature=temperature)
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
    loss = _sampled(user, torch.tensor([2]), table, torch.tensor([1, 3, 3]), temperature=0.1)
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


# --------------------------------------------- pessimistic ranks: ties and NaN count against
def _ranks(user_rows, targets, table_rows):
    user = torch.tensor(user_rows, dtype=torch.float64).reshape(-1, 2)
    table = FixedTable(table_rows)
    corpus = torch.arange(1, len(table_rows))
    return full_corpus_ranks(user, torch.tensor(targets, dtype=torch.int64), table, corpus_ids=corpus).tolist()


UNIT = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]  # items 1..4, unit rows
NAN = float("nan")
INF = float("inf")


def test_ties_count_against_the_target():
    # user (1, 0) scores: item1 1, item2 0, item3 -1, item4 .6; item 5 repeats item 1's row
    rows = UNIT + [[1.0, 0.0]]
    assert _ranks([[1.0, 0.0]] * 2, [1, 5], rows) == [1, 1]  # items 1 and 5 tie for the top
    assert _ranks([[1.0, 0.0]], [2], rows) == [3]  # 1, 5 and 4 score higher


def test_a_user_scoring_every_item_alike_ranks_every_target_last():
    # A zero user state (a model whose outputs are all zero): every score is 0.
    assert _ranks([[0.0, 0.0]] * 4, [1, 2, 3, 4], UNIT) == [3, 3, 3, 3]


def test_nan_scores_rank_last():
    # A NaN target: below every item with a number.
    nan_target = UNIT[:2] + [[NAN, 0.0]] + UNIT[3:]  # item 2 scores NaN for every user
    assert _ranks([[1.0, 0.0], [-1.0, 0.0]], [2, 2], nan_target) == [3, 3]
    # A NaN item never beats a target with a number, even the lowest one.
    assert _ranks([[1.0, 0.0], [1.0, 0.0]], [1, 3], nan_target) == [0, 2]
    # All NaN (a user state of NaN): every target last, NaNs tie and count against it.
    assert _ranks([[NAN, NAN]] * 4, [1, 2, 3, 4], UNIT) == [3, 3, 3, 3]


def test_infinite_scores_follow_the_same_rules():
    # user (inf, 0): item1 +inf, item2 inf * 0 = NaN, item3 -inf, item4 +inf
    user = [[INF, 0.0]]
    assert _ranks(user, [1], UNIT) == [1]  # tied with item 4
    assert _ranks(user, [4], UNIT) == [1]
    assert _ranks(user, [3], UNIT) == [3]  # -inf ties with the NaN item 2: both count against it
    assert _ranks(user, [2], UNIT) == [3]  # NaN: last


def test_one_item_and_no_users():
    assert _ranks([[NAN, NAN], [0.0, 1.0]], [1, 1], UNIT[:2]) == [0, 0]  # nothing else to beat it
    assert _ranks([], [], UNIT) == []


def test_full_softmax_by_hand():
    """Cross-entropy of each label against every other corpus item, cosine scores."""
    table = FixedTable(TABLE)
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    temperature = 0.5
    loss = _full(user, torch.tensor([1, 3]), table, torch.arange(1, 4), temperature=temperature)
    s = 1 / math.sqrt(2)
    # user 0 scores items 1, 2, 3: 1, 0, s (label 1); user 1: 0, 1, s (label 3)
    expected = [
        math.log(math.exp(1 / temperature) + math.exp(0) + math.exp(s / temperature)) - 1 / temperature,
        math.log(math.exp(0) + math.exp(1 / temperature) + math.exp(s / temperature)) - s / temperature,
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_dot_product_scores_use_raw_rows():
    """Without L2 normalisation the scores are raw dot products: user (1, 1) scores item 1
    (1, 0) at 1, item 2 (0, 2) at 2, item 3 (5, 5) at 10."""
    table = FixedTable(TABLE)
    user = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    loss = _full(user, torch.tensor([2]), table, torch.arange(1, 4), temperature=1.0, normalize_items=False)
    expected = math.log(math.exp(1) + math.exp(2) + math.exp(10)) - 2
    torch.testing.assert_close(loss, torch.tensor([expected], dtype=torch.float64))
    sampled = _sampled(user, torch.tensor([2]), table, torch.tensor([2, 3]), temperature=1.0, normalize_items=False)
    # the label itself is masked out: the loss of label 2 against item 3 alone, raw dot products
    assert sampled.item() == math.log(math.exp(2) + math.exp(10)) - 2


def test_dot_product_ranks_differ_from_cosine_ranks():
    """User (1, 0.1), target item 1: dot products 1 (item 1), 0.2 (item 2), 5.5 (item 3) ->
    rank 1; cosines .995, .0995, .774 -> rank 0."""
    table = FixedTable(TABLE)
    user = torch.tensor([[1.0, 0.1]], dtype=torch.float64)
    target, corpus = torch.tensor([1]), torch.arange(1, 4)
    assert full_corpus_ranks(user, target, table, corpus_ids=corpus, normalize_items=False).tolist() == [1]
    unit = torch.nn.functional.normalize(user, dim=-1)
    assert full_corpus_ranks(unit, target, table, corpus_ids=corpus).tolist() == [0]
