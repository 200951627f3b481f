"""Initial values, coalesced tables, pooled outputs and the clear errors of dynamic tables."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.config import ConfigError, ExperimentConfig
from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection, JaggedIds, load_collection, save_collection
from megatron_gr.ops.pytorch.id_hash import bucket_ids, init_scale, initial_values, mix64, mix64_int, owner_ranks, row_salt

CPU = torch.device("cpu")


def config(dim: int = 4, **dynamic) -> EmbeddingTableConfig:
    settings = dict(capacity=256, bucket_size=8, optimizer="sgd", lr=1.0)
    settings.update(dynamic)
    return EmbeddingTableConfig(dim=dim, type="dynamic", init_std=0.1, dynamic=DynamicTableConfig(**settings))


def test_mix_is_splitmix64_and_a_bijection():
    x = torch.tensor([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 12345678901234], dtype=torch.int64)
    assert mix64(x).tolist() == [mix64_int(v) for v in x.tolist()]
    assert mix64_int(0) == 0 and mix64(torch.arange(100_000)).unique().numel() == 100_000


def test_buckets_follow_key_order_and_owners_spread():
    keys = torch.sort(mix64(torch.arange(50_000))).values
    buckets = bucket_ids(keys, 1000)
    assert bool((buckets[1:] >= buckets[:-1]).all()) and buckets.min() == 0 and buckets.max() == 999
    counts = torch.bincount(owner_ranks(keys, 4), minlength=4)
    assert counts.min() > 12_000  # about 12,500 each


def test_initial_values_depend_on_seed_and_id_only():
    ids = torch.tensor([3, 2**40, -7, 3], dtype=torch.int64)
    rows = initial_values(ids, torch.full((4,), row_salt(9)), torch.full((4,), init_scale(0.5)), 6)
    assert torch.equal(rows[0], rows[3]) and not torch.equal(rows[0], rows[1])
    alone = initial_values(ids[1:2], torch.full((1,), row_salt(9)), torch.full((1,), init_scale(0.5)), 6)
    assert torch.equal(alone[0], rows[1])  # no dependence on the batch
    other_seed = initial_values(ids, torch.full((4,), row_salt(10)), torch.full((4,), init_scale(0.5)), 6)
    assert not torch.equal(rows, other_seed)
    many = initial_values(torch.arange(20_000), torch.full((20_000,), row_salt(1)), torch.full((20_000,), init_scale(0.02)), 16)
    assert abs(float(many.mean())) < 2e-4 and abs(float(many.std()) - 0.02) < 2e-4
    assert float(many.abs().max()) <= 0.02 * 3**0.5


def test_lookup_order_and_batch_do_not_change_rows():
    one, two = (DynamicEmbeddingCollection({"t": config()}, default_seed=4, device=CPU) for _ in range(2))
    ids = torch.tensor([9, 2**50, -3, 9, 17], dtype=torch.int64)
    rows = one.lookup("t", ids)
    reversed_rows = two.lookup("t", ids.flip(0)).flip(0)
    assert torch.equal(rows, reversed_rows)


def test_coalesced_tables_share_slots_but_not_rows():
    tables = {"a": config(group="shared", seed=1), "b": config(group="shared", seed=2, pooling="sum")}
    collection = DynamicEmbeddingCollection(tables, default_seed=0, device=CPU)
    assert list(collection.tables) == ["shared"]
    ids = torch.tensor([5, 6], dtype=torch.int64)
    out = collection({"a": JaggedIds(ids, torch.tensor([0, 1, 2])), "b": JaggedIds(ids, torch.tensor([0, 2]))})
    expected_a = initial_values(ids, torch.full((2,), row_salt(1)), torch.full((2,), init_scale(0.1)), 4)
    expected_b = initial_values(ids, torch.full((2,), row_salt(2)), torch.full((2,), init_scale(0.1)), 4)
    torch.testing.assert_close(out["a"], expected_a)
    torch.testing.assert_close(out["b"], expected_b.sum(0, keepdim=True))
    (out["a"].sum() + 2 * out["b"].sum()).backward()
    collection.tables["shared"].apply_step(dense_lr=1.0)
    assert collection.tables["shared"].statistics()["occupancy"] == 4  # (a,5) (a,6) (b,5) (b,6)
    after = collection({"a": JaggedIds(ids, torch.tensor([0, 1, 2])), "b": JaggedIds(ids, torch.tensor([0, 2]))})
    torch.testing.assert_close(after["a"], expected_a - 1.0)
    torch.testing.assert_close(after["b"], (expected_b - 2.0).sum(0, keepdim=True))


def test_pooled_outputs_and_empty_bags():
    collection = DynamicEmbeddingCollection(
        {"s": config(pooling="sum"), "m": config(pooling="mean"), "n": config()}, default_seed=0, device=CPU
    )
    ids = torch.tensor([1, 2, 3, 1], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 3, 4])  # bags [1 2 3], [], [1]
    out = collection({name: JaggedIds(ids, offsets) for name in ("s", "m", "n")})
    rows = out["n"]  # unpooled rows of the same ids (same default seed, same values)
    torch.testing.assert_close(out["s"], torch.stack([rows[:3].sum(0), torch.zeros(4), rows[3]]))
    torch.testing.assert_close(out["m"], torch.stack([rows[:3].mean(0), torch.zeros(4), rows[3]]))


def test_wrong_id_dtype_is_a_clear_error():
    collection = DynamicEmbeddingCollection({"t": config()}, default_seed=0, device=CPU)
    with pytest.raises(TypeError, match=r"takes int64 ids, got torch.int32"):
        collection.lookup("t", torch.tensor([1, 2], dtype=torch.int32))


def test_coalesced_group_must_agree():
    with pytest.raises(ConfigError, match=r"embeddings.b.dim=8 differs from embeddings.a.dim=4.*group 'g'"):
        DynamicEmbeddingCollection({"a": config(group="g"), "b": config(dim=8, group="g")}, default_seed=0, device=CPU)
    with pytest.raises(ConfigError, match=r"embeddings.b.dynamic.optimizer='adam' differs .*'sgd'"):
        DynamicEmbeddingCollection({"a": config(group="g"), "b": config(group="g", optimizer="adam")}, default_seed=0, device=CPU)
    with pytest.raises(ConfigError, match=r"embeddings.a has no group, but other tables name 'a' as their group"):
        DynamicEmbeddingCollection({"a": config(), "b": config(group="a")}, default_seed=0, device=CPU)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(dim=8), ["dim=4", "dim=8"]),
        (dict(optimizer="adam"), ["optimizer='sgd'", "optimizer='adam'"]),
        (dict(seed=99), ["features=", "99"]),
    ],
)
def test_checkpoint_of_another_configuration_is_refused(tmp_path, change, words):
    saved = DynamicEmbeddingCollection({"t": config(seed=1)}, default_seed=0, device=CPU)
    saved.lookup("t", torch.tensor([1, 2, 3]))
    save_collection(saved, tmp_path)
    settings = {"seed": 1, **change}
    dim = settings.pop("dim", 4)
    other = DynamicEmbeddingCollection({"t": config(dim=dim, **settings)}, default_seed=0, device=CPU)
    with pytest.raises(ValueError) as caught:
        load_collection(other, tmp_path)
    for word in words + ["was saved with", "load it with the table configuration that saved it"]:
        assert word in str(caught.value)


def test_bigger_or_smaller_capacity_loads(tmp_path):
    saved = DynamicEmbeddingCollection({"t": config(capacity=256)}, default_seed=0, device=CPU)
    ids = torch.arange(40)
    saved.lookup("t", ids)
    save_collection(saved, tmp_path)
    for capacity, bucket_size in ((64, 32), (4096, 8)):
        loaded = DynamicEmbeddingCollection({"t": config(capacity=capacity, bucket_size=bucket_size)}, default_seed=0, device=CPU)
        load_collection(loaded, tmp_path)
        assert loaded.tables["t"].statistics()["occupancy"] == 40
    with pytest.raises(ValueError, match="do not fit"):
        load_collection(DynamicEmbeddingCollection({"t": config(capacity=16)}, default_seed=0, device=CPU), tmp_path)


@pytest.mark.parametrize(
    "table, words",
    [
        ({"type": "dynamic", "dynamic": {"capacity": 0}}, ["embeddings.item.dynamic.capacity=0", ">= 1"]),
        ({"type": "dynamic", "dynamic": {"eviction": "fifo"}}, ["dynamic.eviction='fifo'", "'lru', 'lfu', 'none'"]),
        ({"type": "dynamic", "dynamic": {"optimizer": "lamb"}}, ["dynamic.optimizer='lamb'", "'rowwise_adagrad'"]),
        ({"type": "dynamic", "dynamic": {"admission_threshold": 0}}, ["admission_threshold=0", ">= 1"]),
        ({"type": "dynamic", "dynamic": {"capacty": 5}}, ["unknown key embeddings.item.dynamic.capacty", "capacity"]),
        ({"type": "dynamic", "num_embeddings": 100}, ["num_embeddings=100", "dynamic.capacity"]),
        ({"dynamic": {"capacity": 10}}, ["type='plain'", "type=dynamic"]),
    ],
)
def test_bad_dynamic_config_is_a_clear_error(table, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({"embeddings": {"item": table}})
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_dynamic_config_from_yaml_and_set(tmp_path):
    from megatron_gr.config import resolve_config

    path = tmp_path / "c.yaml"
    path.write_text("embeddings:\n  item:\n    type: dynamic\n    dynamic:\n      capacity: 1000\n      eviction: lfu\n")
    config = resolve_config(str(path), [(["embeddings", "item", "dynamic", "optimizer"], "rowwise_adagrad")])
    item = config.embeddings["item"]
    assert item.type == "dynamic" and item.dynamic.capacity == 1000 and item.dynamic.eviction == "lfu"
    assert item.dynamic.optimizer == "rowwise_adagrad" and item.keyed_by_raw_ids
    assert ExperimentConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_killed_dump_keeps_the_previous_one(tmp_path, monkeypatch):
    from megatron_gr.embeddings.dynamic import dump, load_dumps

    table = DynamicEmbeddingCollection({"t": config()}, default_seed=0, device=CPU)
    table.lookup("t", torch.arange(10))
    dump(table, tmp_path / "dump", incremental=False)
    table.lookup("t", torch.arange(10, 20))

    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        dump(table, tmp_path / "dump", incremental=False)
    monkeypatch.undo()
    restored = DynamicEmbeddingCollection({"t": config()}, default_seed=0, device=CPU)
    load_dumps(restored, [tmp_path / "dump"])
    assert restored.tables["t"].statistics()["occupancy"] == 10
