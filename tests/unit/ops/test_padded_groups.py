"""The grouping, probe and segment sum with the distinct count left on the device (a lookup
on one rank reads nothing back): padded to the input count, every real entry equal to the
host-sized result, the padding inert (offsets N, counts 0, slot -1, status PADDING, zero
sums). PyTorch on the CPU; Triton in the interpreter (or on a GPU)."""

from __future__ import annotations

import pytest

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

import torch  # noqa: E402

from megatron_gr.ops import hash_table  # noqa: E402
from megatron_gr.ops.pytorch.hash_probe import PADDING  # noqa: E402
from megatron_gr.ops.segment_sum import segment_sum, sorted_groups  # noqa: E402
from tests.unit.ops.hash_table_inputs import empty_table, random_queries  # noqa: E402

BACKENDS = ["pytorch", "triton"]


def _device(kernel: str) -> str:
    return DEVICE if kernel == "triton" else "cpu"


@pytest.mark.parametrize("kernel", BACKENDS)
@pytest.mark.parametrize("with_minor", [False, True])
def test_padded_groups_equal_the_host_sized_ones(kernel, with_minor):
    generator = torch.Generator().manual_seed(5)
    keys = torch.randint(-6, 6, (300,), generator=generator) * (2**40 + 1)
    minor = torch.randint(0, 3, (300,), generator=generator).to(torch.int32)
    ids = torch.randint(-(2**62), 2**62, (300,), generator=generator)
    device = _device(kernel)
    args = (keys.to(device), minor.to(device) if with_minor else None)
    take = (ids.to(device), minor.to(device))
    sized = sorted_groups(*args, take=take, kernel=kernel)
    padded = sorted_groups(*args, take=take, kernel=kernel, count_on_host=False)
    real = sized.num_groups
    assert sized.valid is None and int(padded.valid) == real < 300
    for name in ("order", "segments", "inverse"):
        assert torch.equal(getattr(padded, name), getattr(sized, name)), name
    for name in ("unique", "counts", "first"):
        assert getattr(padded, name).shape == (300,) and torch.equal(getattr(padded, name)[:real], getattr(sized, name)), name
    for a, b in zip(padded.taken, sized.taken):
        assert torch.equal(a[:real], b)
    assert torch.equal(padded.offsets[: real + 1], sized.offsets) and bool((padded.offsets[real:] == 300).all())
    assert bool((padded.counts[real:] == 0).all()) and bool((padded.first[real:] == 0).all())

    values = torch.randn(300, 4, generator=generator).to(device) * 1e3
    sums = segment_sum(values, padded, kernel=kernel)
    assert sums.shape == (300, 4) and torch.equal(sums[:real], segment_sum(values, sized, kernel=kernel))
    assert bool((sums[real:] == 0).all())


@pytest.mark.parametrize("kernel", BACKENDS)
def test_padded_probe_serves_the_real_queries_only(kernel):
    """Queries padded with live-looking garbage (ids of this stream, in the same buckets):
    the real ones get what the unpadded probe gives, in the same table state; the padding
    gets slot -1 and status PADDING, and inserts, scores and marks nothing."""
    device = _device(kernel)
    generator = torch.Generator().manual_seed(2)
    tables = {k: {n: t.to(device) for n, t in empty_table(8, 4).items()} for k in ("sized", "padded")}
    for step in range(6):
        batch = [q.to(device) for q in random_queries(generator, 20, 40)]  # distinct, sorted by key
        real = batch[0].numel()
        pad = [torch.cat([q, q.flip(0)]) for q in batch]  # the same ids again past the real ones
        options = dict(num_buckets=8, bucket_size=4, step=step, policy="lru", update_scores=True, kernel=kernel)
        sized = hash_table.probe(*(tables["sized"][n] for n in ("keys", "tags", "last_seen", "freq", "changed")), *batch, **options)
        padded = hash_table.probe(
            *(tables["padded"][n] for n in ("keys", "tags", "last_seen", "freq", "changed")), *pad,
            valid=torch.tensor(real, device=device), **options,
        )
        for field in ("slots", "status", "evicted_keys", "evicted_tags"):
            assert torch.equal(getattr(padded, field)[:real], getattr(sized, field)), (step, field)
        assert bool((padded.slots[real:] == -1).all()) and bool((padded.status[real:] == PADDING).all())
        for name in tables["sized"]:
            assert torch.equal(tables["sized"][name], tables["padded"][name]), (step, name)
