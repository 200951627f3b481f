"""Triton kernels of the dynamic embeddings against their PyTorch references: bit for bit
for hashing, probing, rows, gathers and segment sums; to rounding for optimizer updates.
Without a GPU they run in the Triton interpreter (small sizes); ``gpu`` tests repeat them at
scale."""

from __future__ import annotations

import pytest

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

import torch  # noqa: E402

from megatron_gr.ops import hash_table  # noqa: E402
from megatron_gr.ops.pytorch.hash_probe import NO_ROOM, REPLACED  # noqa: E402
from megatron_gr.ops.pytorch.id_hash import bucket_ids, init_scale, row_salt  # noqa: E402
from megatron_gr.ops.pytorch.segment_sum import CHUNK, pytorch_segment_sum  # noqa: E402
from megatron_gr.ops.segment_sum import gather_rows, segment_sum, sorted_groups  # noqa: E402
from megatron_gr.ops.sparse_optimizers import sparse_update  # noqa: E402
from megatron_gr.ops.triton.segment_sum import triton_segment_sum  # noqa: E402
from tests.support.parity import assert_close_to_scale  # noqa: E402
from tests.unit.ops.hash_table_inputs import empty_table, random_queries  # noqa: E402


def test_routing_keys_are_bit_identical():
    ids = torch.randint(-(2**63), 2**63 - 1, (3000,), dtype=torch.int64, device=DEVICE)
    tags = torch.randint(0, 5, (3000,), dtype=torch.int32, device=DEVICE)
    for t in (None, tags):
        assert torch.equal(hash_table.routing_keys(ids, t, kernel="triton"), hash_table.routing_keys(ids, t, kernel="pytorch"))


def _probe_parity(num_buckets, bucket_size, steps, queries_per_step, seed, id_space=50, policies=("lru", "lfu", "none"), queries=None):
    """Both probes on the same stream; every result and table word must agree. ``queries``:
    ``(generator, step) -> query tensors`` instead of :func:`random_queries`. Returns the
    statuses seen under each policy."""
    generator = torch.Generator().manual_seed(seed)
    seen = {}
    for policy in policies:
        seen[policy] = set()
        tables = {k: {n: t.to(DEVICE) for n, t in empty_table(num_buckets, bucket_size).items()} for k in ("pytorch", "triton")}
        for step in range(steps):
            batch = queries(generator, step) if queries else random_queries(generator, queries_per_step, id_space)
            batch = [q.to(DEVICE) for q in batch]
            results = {
                kernel: hash_table.probe(
                    *(table[n] for n in ("keys", "tags", "last_seen", "freq", "changed")), *batch,
                    num_buckets=num_buckets, bucket_size=bucket_size, step=step, policy=policy,
                    update_scores=step % 3 != 2, kernel=kernel,
                )
                for kernel, table in tables.items()
            }
            ref, got = results["pytorch"], results["triton"]
            for field in ("slots", "status", "evicted_keys", "evicted_tags"):
                assert torch.equal(getattr(ref, field), getattr(got, field)), (policy, step, field)
            for name in tables["pytorch"]:
                assert torch.equal(tables["pytorch"][name], tables["triton"][name]), (policy, step, name)
            seen[policy].update(ref.status.tolist())
    return seen


def test_probe_is_identical_to_the_reference():
    _probe_parity(num_buckets=4, bucket_size=5, steps=3, queries_per_step=16, seed=0)


def test_probe_with_more_queries_per_bucket_than_the_kernel_loads_at_once():
    _probe_parity(num_buckets=1, bucket_size=12, steps=2, queries_per_step=20, seed=1)


def _one_bucket_queries(count, id_space, num_buckets=1):
    """``(generator, step) -> queries`` that all fall into one bucket of ``num_buckets``
    (ids filtered by their routing key), repeated ids carrying large counts."""

    def draw(generator, step):
        ids, tags, hashes, counts, may_insert = random_queries(generator, 40 * count, id_space)
        keep = torch.nonzero(bucket_ids(hashes, num_buckets) == num_buckets // 2).squeeze(1)[:count]
        counts = torch.randint(1, 1000, (keep.numel(),), generator=generator)
        return ids[keep], tags[keep], hashes[keep], counts, may_insert[keep]

    return draw


def test_probe_all_queries_in_one_bucket_evict_and_overflow():
    # Up to 150 distinct keys for a 64-slot bucket: the first step fills it and the rest find
    # no room; later steps evict (lru, lfu) or stay full (none); runs span many blocks.
    _probe_parity(num_buckets=3, bucket_size=64, steps=4, queries_per_step=0, seed=11, queries=_one_bucket_queries(150, 1000, 3))


def test_probe_one_query_and_none():
    def draw(generator, step):
        ids, tags, hashes, counts, may_insert = random_queries(generator, 8, 1000)
        return [t[: 1 if step % 2 else 0] for t in (ids, tags, hashes, counts, may_insert)]

    _probe_parity(num_buckets=5, bucket_size=4, steps=4, queries_per_step=0, seed=12, queries=draw)


@pytest.mark.parametrize(
    "num_buckets, bucket_size, queries_per_step, steps, policies",
    [(7, 3, 60, 4, ("lru", "lfu", "none")), (2, 72, 120, 3, ("lru", "lfu")), (160, 4, 1500, 2, ("lru",))],
)
def test_probe_fills_the_table_and_evicts(num_buckets, bucket_size, queries_per_step, steps, policies):
    # More distinct keys than slots over the steps (a full table, lru/lfu victims), more and
    # fewer queries than buckets, a bucket wider than 64 lanes, several compaction blocks.
    # The interpreter inserts a bucket's new keys one at a time: the wide bucket is 72 slots
    # (128 lanes, as 100 were) in 2 buckets, and ~1300 distinct queries per step (1308, 1291:
    # still over RUNS_BLOCK = 1024) go to 160 buckets, not 400: 24 s and 35 s of CPU, not
    # 70 s and 61 s, for the same checks.
    seen = _probe_parity(
        num_buckets, bucket_size, steps=steps, queries_per_step=queries_per_step, seed=bucket_size,
        id_space=4 * num_buckets * bucket_size, policies=policies,
    )
    for policy, statuses in seen.items():  # the table filled: victims, or no room without eviction
        assert (NO_ROOM if policy == "none" else REPLACED) in statuses, (policy, statuses)


def _row_inputs(generator, capacity, count):
    status = torch.randint(0, 5, (count,), generator=generator).to(torch.int8)
    slots = torch.where(status <= 2, torch.randperm(capacity, generator=generator)[:count], -1)
    ids = torch.randint(-(2**62), 2**62, (count,), generator=generator)
    tags = torch.randint(0, 2, (count,), generator=generator).to(torch.int32)
    return slots, status, ids, tags


def _constants():
    salts = torch.tensor([row_salt(3), row_salt(11)], device=DEVICE)
    scales = torch.tensor([init_scale(0.02), init_scale(0.5)], device=DEVICE)
    return salts, scales


def test_initialised_and_read_rows_are_bit_identical():
    generator = torch.Generator().manual_seed(2)
    capacity, dim, count = 40, 7, 16
    salts, scales = _constants()
    for flags in (False, True):
        weights = torch.randn(capacity, dim, generator=generator).to(DEVICE)
        fresh = (torch.rand(capacity, generator=generator) < 0.3).to(torch.uint8).to(DEVICE) if flags else None
        slots, status, ids, tags = (t.to(DEVICE) for t in _row_inputs(generator, capacity, count))
        index = torch.randint(0, count, (50,), generator=generator).to(DEVICE)
        out = {}
        for kernel in ("pytorch", "triton"):
            w, f = weights.clone(), fresh.clone() if flags else None
            hash_table.init_rows(w, f, slots, status, ids, tags, salts, scales, kernel=kernel)
            rows = hash_table.read_rows(w, slots, ids, tags, salts, scales, kernel=kernel)
            gathered = hash_table.read_rows(w, slots, ids, tags, salts, scales, index=index, kernel=kernel)
            out[kernel] = [rows, gathered, w] + ([f] if flags else [])
        for a, b in zip(out["pytorch"], out["triton"]):
            assert torch.equal(a, b)
        assert torch.equal(out["triton"][1], out["triton"][0][index])


def _segment_parity(count, dim, hot, hot_count, chunk, seed, key_space=50):
    """Triton's gather and segment sum against the reference, bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, key_space, (count,), generator=generator)
    keys[torch.randperm(count, generator=generator)[:hot_count]] = hot
    values = torch.randn(count, dim, generator=generator) * torch.logspace(-4, 4, count)[:, None]
    values[0] = -0.0
    groups = sorted_groups(keys.to(DEVICE))
    values = values.to(DEVICE)
    args = (groups.order, groups.segments, groups.offsets)
    expected = pytorch_segment_sum(*(t.cpu() for t in (values, *args)), chunk=chunk)
    got = triton_segment_sum(values, *args, chunk=chunk)
    assert torch.equal(got.cpu(), expected)
    rows = torch.randn(groups.num_groups, dim, generator=generator).to(DEVICE)
    assert torch.equal(gather_rows(rows, groups.inverse, kernel="triton"), rows[groups.inverse])


@pytest.mark.parametrize("count, chunk", [(1, 8), (37, 8), (300, 8), (640, 64)])
def test_segment_sum_is_bit_identical_to_the_reference(count, chunk):
    # A hot key over many windows, windows that start and end inside groups, a -0.0 row.
    _segment_parity(count, dim=12, hot=7, hot_count=count // 2, chunk=chunk, seed=count)


def test_segment_sum_through_the_dispatcher():
    generator = torch.Generator().manual_seed(4)
    groups = sorted_groups(torch.randint(0, 9, (90,), generator=generator).to(DEVICE))
    values = torch.randn(90, 5, generator=generator).to(DEVICE)
    assert torch.equal(segment_sum(values, groups, kernel="triton"), segment_sum(values, groups, kernel="pytorch"))


def _groups_parity(keys, minor=None, take=()):
    """The Triton grouping against the PyTorch one: every field, bit for bit."""
    ref = sorted_groups(keys, minor, take=take, kernel="pytorch")
    got = sorted_groups(keys, minor, take=take, kernel="triton")
    for name in ("order", "segments", "offsets", "inverse", "unique", "counts", "first"):
        a, b = getattr(ref, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert len(ref.taken) == len(got.taken) == len(take)
    for a, b in zip(ref.taken, got.taken):
        assert a.dtype == b.dtype and torch.equal(a, b)
    return got


@pytest.mark.parametrize("count, key_space, with_minor", [(1, 5, False), (1, 5, True), (37, 5, False), (3000, 700, False), (3000, 40, True)])
def test_groups_are_identical_to_the_reference(count, key_space, with_minor):
    # 3000 sorted positions: three tiles of GROUP_SUB, groups across their borders.
    generator = torch.Generator().manual_seed(count + key_space)
    keys = torch.randint(-key_space, key_space, (count,), generator=generator) * (2**40 + 1)
    keys[torch.randperm(count, generator=generator)[: count // 3]] = 3
    minor = torch.randint(0, 3, (count,), generator=generator).to(torch.int32)
    ids = torch.randint(-(2**62), 2**62, (count,), generator=generator)
    tags = torch.randint(0, 9, (count,), generator=generator).to(torch.int32)
    groups = _groups_parity(keys.to(DEVICE), minor.to(DEVICE) if with_minor else None, (ids.to(DEVICE), tags.to(DEVICE)))
    assert int(groups.counts.sum()) == count


def test_groups_in_tiles_of_several_steps(monkeypatch):
    # Small tiles walked in several steps, the earlier tiles' counts read in several blocks,
    # one key over many tiles, all keys equal, all distinct, three take tensors (the third
    # gathered after the host read).
    from megatron_gr.ops.triton import segment_sum as kernels

    monkeypatch.setattr(kernels, "GROUP_SUB", 16)
    monkeypatch.setattr(kernels, "TILES_MAX", 4)
    monkeypatch.setattr(kernels, "TILES_BLOCK", 2)
    generator = torch.Generator().manual_seed(21)
    keys = torch.randint(0, 30, (500,), generator=generator)
    keys[torch.randperm(500, generator=generator)[:200]] = 17
    extra = [torch.arange(500) * 3, torch.randint(0, 2, (500,), generator=generator).to(torch.uint8), -torch.arange(500)]
    for k in (keys, torch.zeros(500, dtype=torch.int64), torch.randperm(500, generator=generator)):
        _groups_parity(k.to(DEVICE), None, tuple(t.to(DEVICE) for t in extra))
    _groups_parity(keys.to(DEVICE), (keys % 3).to(DEVICE), (keys.to(DEVICE),))


@pytest.mark.parametrize("flags", [False, True])
@pytest.mark.parametrize("optimizer, shapes", [("sgd", []), ("adagrad", ["row"]), ("rowwise_adagrad", ["scalar"]), ("adam", ["row", "row"])])
def test_sparse_updates_match_the_reference(optimizer, shapes, flags):
    generator = torch.Generator().manual_seed(3)
    capacity, dim = 30, 6
    weights = torch.randn(capacity, dim, generator=generator).to(DEVICE)
    states = [(torch.rand(capacity, dim) if s == "row" else torch.rand(capacity)).to(DEVICE) for s in shapes]
    fresh = (torch.rand(capacity, generator=generator) < 0.5).to(torch.uint8).to(DEVICE) if flags else None
    slots = torch.randperm(capacity, generator=generator)[:12]
    slots[4] = -1
    grads = torch.randn(12, dim, generator=generator)
    out = {}
    for kernel in ("pytorch", "triton"):
        w, st, f = weights.clone(), [s.clone() for s in states], fresh.clone() if flags else None
        sparse_update(w, st, slots.to(DEVICE), grads.to(DEVICE), optimizer=optimizer, lr=0.1, step=3, beta1=0.9,
                      beta2=0.98, eps=1e-8, grad_scale=0.5, fresh=f, state_init=[0.25] * len(st), kernel=kernel)
        out[kernel] = (w, st, f)
    # Same formulas, roundings that may differ by an ulp of the operands (~1; seen: one ulp of
    # the largest entry): compared to each tensor's largest entry; a wrong update moves
    # weights by about lr = 0.1.
    assert_close_to_scale(out["triton"][0], out["pytorch"][0], rtol=1e-5, what=f"{optimizer} weights")
    for a, b in zip(out["triton"][1], out["pytorch"][1]):
        assert_close_to_scale(a, b, rtol=1e-5, what=f"{optimizer} state")
    if flags:
        assert torch.equal(out["triton"][2], out["pytorch"][2])


@pytest.mark.parametrize("skipped", [False, True])
def test_sparse_updates_take_their_scale_and_verdict_from_the_device(skipped):
    """The step decided on the device: the gradient scale and the skip flag are 0-dim
    tensors. Not skipped, the update equals the one with the scale as a number; skipped,
    nothing is written, fresh flags included, in both kernels."""
    generator = torch.Generator().manual_seed(4)
    capacity, dim = 20, 5
    weights = torch.randn(capacity, dim, generator=generator).to(DEVICE)
    states = [torch.rand(capacity, dim, generator=generator).to(DEVICE) for _ in range(2)]
    fresh = (torch.rand(capacity, generator=generator) < 0.5).to(torch.uint8).to(DEVICE)
    slots = torch.randperm(capacity, generator=generator)[:8].to(DEVICE)
    grads = torch.randn(8, dim, generator=generator).to(DEVICE)
    options = dict(optimizer="adam", lr=0.1, step=2, beta1=0.9, beta2=0.98, eps=1e-8, state_init=[0.0, 0.0])
    for kernel in ("pytorch", "triton"):
        runs = {}
        for name, scale, skip in (("number", 0.25, None),
                                  ("tensor", torch.full((), 0.25, device=DEVICE), torch.full((), float(skipped), device=DEVICE))):
            w, st, f = weights.clone(), [t.clone() for t in states], fresh.clone()
            sparse_update(w, st, slots, grads, grad_scale=scale, skip=skip, fresh=f, kernel=kernel, **options)
            runs[name] = (w, st, f)
        w, st, f = runs["tensor"]
        if skipped:
            assert torch.equal(w, weights) and all(torch.equal(a, b) for a, b in zip(st, states)), kernel
            assert torch.equal(f, fresh), kernel
        else:
            assert not torch.equal(w, weights), kernel
            assert torch.equal(w, runs["number"][0]) and torch.equal(f, runs["number"][2]), kernel
            assert all(torch.equal(a, b) for a, b in zip(st, runs["number"][1])), kernel
    with pytest.raises(ValueError, match="0-dim"):
        sparse_update(weights.clone(), [t.clone() for t in states], slots, grads, grad_scale=torch.ones(1, device=DEVICE),
                      kernel="pytorch", **options)


@pytest.mark.gpu
def test_probe_at_scale_on_gpu():
    # About 190k rows competing for 192k slots: buckets overflow and evict.
    _probe_parity(num_buckets=3000, bucket_size=64, steps=6, queries_per_step=100_000, seed=5, id_space=2**40)


@pytest.mark.gpu
def test_probe_per_bucket_at_scale_on_gpu():
    # The benchmark's regime: ~3 queries per bucket of 64, 30k buckets (fewer queries than
    # buckets on the first step, more after), the table filling up and evicting; then one
    # bucket with thousands of queries (runs of many blocks, evictions and overflow).
    _probe_parity(num_buckets=30_000, bucket_size=64, steps=5, queries_per_step=90_000, seed=8, id_space=2**21)
    _probe_parity(num_buckets=50, bucket_size=64, steps=3, queries_per_step=0, seed=9, queries=_one_bucket_queries(3000, 2**40, 50))


@pytest.mark.gpu
def test_segment_sum_at_scale_on_gpu():
    # The benchmark's shape: 1.05M rows of 128 into ~300k groups, one key 30,000 times
    # (118 windows of the default CHUNK), dim 128.
    _segment_parity(1_050_000, dim=128, hot=123, hot_count=30_000, chunk=CHUNK, seed=6, key_space=400_000)


@pytest.mark.gpu
def test_groups_at_scale_on_gpu():
    # The benchmark's dedupe: 1.05M Zipf-like routing keys (~475k groups, a hot key over many
    # tiles), then the coalesced form with tags as the minor key.
    generator = torch.Generator().manual_seed(10)
    ranks = (1 / torch.rand(1_050_000, generator=generator) ** 1.2).clamp(max=2**40).to(torch.int64)
    keys = hash_table.routing_keys(ranks)
    tags = torch.randint(0, 4, (keys.numel(),), generator=generator).to(torch.int32)
    _groups_parity(keys.to(DEVICE), None, (ranks.to(DEVICE), tags.to(DEVICE)))
    _groups_parity(keys.to(DEVICE), tags.to(DEVICE), (ranks.to(DEVICE), tags.to(DEVICE)))


@pytest.mark.gpu
def test_rows_at_scale_on_gpu():
    generator = torch.Generator().manual_seed(7)
    capacity, dim, count = 200_000, 128, 150_000
    salts, scales = _constants()
    weights = torch.randn(capacity, dim, generator=generator).to(DEVICE)
    fresh = torch.zeros(capacity, dtype=torch.uint8, device=DEVICE)
    slots, status, ids, tags = (t.to(DEVICE) for t in _row_inputs(generator, capacity, count))
    index = torch.randint(0, count, (400_000,), generator=generator).to(DEVICE)
    out = {}
    for kernel in ("pytorch", "triton"):
        w, f = weights.clone(), fresh.clone()
        hash_table.init_rows(w, f, slots, status, ids, tags, salts, scales, kernel=kernel)
        out[kernel] = [hash_table.read_rows(w, slots, ids, tags, salts, scales, index=index, kernel=kernel), w, f]
    for a, b in zip(out["pytorch"], out["triton"]):
        assert torch.equal(a, b)
