"""Grouping by a stable sort and the reference segment sum, against independent
implementations: the documented layout, ``torch.unique``, and a position-by-position loop
that follows the documented summation order."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.ops.pytorch.segment_sum import pytorch_segment_sum
from megatron_gr.ops.segment_sum import segment_sum, sorted_groups


def test_groups_follow_the_documented_layout():
    groups = sorted_groups(torch.tensor([7, 3, 7, 5, 3]))
    assert groups.order.tolist() == [1, 4, 3, 0, 2]
    assert groups.segments.tolist() == [0, 0, 1, 2, 2]
    assert groups.offsets.tolist() == [0, 2, 3, 5]
    assert groups.inverse.tolist() == [2, 0, 2, 1, 0]
    assert groups.counts.tolist() == [2, 1, 2]
    assert groups.first.tolist() == [1, 3, 0]
    assert groups.unique.tolist() == [3, 5, 7]
    taken = sorted_groups(torch.tensor([7, 3, 7, 5, 3]), take=(torch.tensor([10, 11, 12, 13, 14]),)).taken
    assert [t.tolist() for t in taken] == [[11, 13, 10]]


@pytest.mark.parametrize("with_minor", [False, True])
def test_groups_equal_torch_unique(with_minor):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(-5, 5, (400,), generator=generator)
    minor = torch.randint(0, 3, (400,), generator=generator)
    groups = sorted_groups(keys, minor if with_minor else None)
    if with_minor:
        pairs, inverse, counts = torch.unique(torch.stack([keys, minor], 1), dim=0, return_inverse=True, return_counts=True)
        assert torch.equal(torch.stack([keys, minor], 1)[groups.first], pairs)
    else:
        unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        assert torch.equal(keys[groups.first], unique)
    assert torch.equal(groups.inverse, inverse) and torch.equal(groups.counts, counts)
    # stable: within a group, sorted positions keep input order
    for g in range(groups.num_groups):
        members = groups.order[groups.offsets[g]:groups.offsets[g + 1]]
        assert torch.equal(members, torch.sort(members).values)
    assert torch.equal(groups.segments, groups.inverse[groups.order])


def test_no_keys_make_no_groups():
    groups = sorted_groups(torch.zeros(0, dtype=torch.int64))
    assert groups.num_groups == 0 and groups.offsets.tolist() == [0]
    assert segment_sum(torch.zeros(0, 3), groups).shape == (0, 3)


def _documented_order(values, groups, chunk):
    """Pieces cut at group starts and at multiples of ``chunk`` sorted positions, each summed
    from +0.0 left to right, then a group's pieces summed from +0.0 left to right."""
    out = torch.zeros(groups.num_groups, values.shape[1])
    for g in range(groups.num_groups):
        start, stop = int(groups.offsets[g]), int(groups.offsets[g + 1])
        total, piece = torch.zeros(values.shape[1]), torch.zeros(values.shape[1])
        for p in range(start, stop):
            if p > start and p % chunk == 0:
                total, piece = total + piece, torch.zeros(values.shape[1])
            piece = piece + values[groups.order[p]]
        out[g] = total + piece
    return out


@pytest.mark.parametrize("chunk", [4, 16, 256])
def test_segment_sum_follows_the_documented_order(chunk):
    generator = torch.Generator().manual_seed(chunk)
    keys = torch.randint(0, 30, (700,), generator=generator)
    keys[torch.randperm(700, generator=generator)[:300]] = 11  # a hot key over many windows
    # Magnitudes over 12 decades: another summation order would change the low bits.
    values = torch.randn(700, 5, generator=generator) * torch.logspace(-6, 6, 700)[:, None]
    values[3] = -0.0
    groups = sorted_groups(keys)
    got = pytorch_segment_sum(values, groups.order, groups.segments, groups.offsets, chunk=chunk)
    assert torch.equal(got, _documented_order(values, groups, chunk))
    assert not torch.equal(got, torch.zeros_like(got).index_add_(0, groups.inverse.flip(0), values.flip(0)))
