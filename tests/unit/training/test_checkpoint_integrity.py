"""Damaged checkpoints: a flipped byte, a truncated, deleted or garbage file (shards,
``.metadata``, ``common.pt``, the tracker, dynamic-table files, the manifest) is one
CheckpointError line naming the file and the previous complete checkpoint; checksums are
written with every checkpoint and verified before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_integrity import looks_complete, read_manifest, sha256_of, verify, write_manifest
from megatron_gr.training.checkpoint_layout import TRACKER, iteration_dir
from megatron_gr.training.trainer import Trainer
from tests.unit.training.checkpoint_helpers import assert_one_error_line, config_file, run_cli, weights
from tests.unit.training.helpers import tiny_config

TWO_SAVES = {"train_iters": 2, "lr_decay_iters": 2, "lr_warmup_iters": 0}
DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 256}}}


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------ the manifest alone
def test_manifest_records_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 1000)
    write_manifest(tmp_path, facts={"model_type": "M"})
    manifest = read_manifest(tmp_path)
    assert manifest["facts"] == {"model_type": "M"}
    assert manifest["files"] == {
        "a.bin": {"bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        "sub/b.bin": {"bytes": 1000, "sha256": sha256_of(tmp_path / "sub" / "b.bin")},
    }
    verify(tmp_path, manifest)
    assert looks_complete(tmp_path)


@pytest.mark.parametrize("damage, words", [
    (lambda d: _flip_byte(d / "sub" / "b.bin", 500), ["sub/b.bin is damaged: its sha256 differs"]),
    (lambda d: (d / "sub" / "b.bin").write_bytes(b"x" * 999), ["sub/b.bin is damaged: 999 bytes where manifest.json records 1000"]),
    (lambda d: (d / "a.bin").unlink(), ["a.bin is missing"]),
])
def test_verify_names_the_damaged_file(tmp_path, damage, words):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 1000)
    write_manifest(tmp_path, facts={})
    damage(tmp_path)
    with pytest.raises(CheckpointError) as error:
        verify(tmp_path, read_manifest(tmp_path), hint="; HINT")
    for word in words:
        assert word in str(error.value)
    assert str(error.value).endswith("; HINT")


# ------------------------------------------------------------ whole checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(megatron_cpu, tmp_path_factory):
    """A run that saved after steps 1 and 2."""
    return _two_saves(tmp_path_factory.mktemp("integrity"))


def _two_saves(tmp: Path, **sections) -> Path:
    ckpt = tmp / "ckpt"
    Trainer(tiny_config(tmp / "run", training=TWO_SAVES, checkpoint={"save": str(ckpt), "save_interval": 1}, **sections)).train()
    assert (iteration_dir(ckpt, 1) / "manifest.json").is_file() and (iteration_dir(ckpt, 2) / "manifest.json").is_file()
    return ckpt


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    return copy


def _shard(directory: Path) -> Path:
    return sorted(directory.glob("*.distcp"))[0]


PREVIOUS = "the previous complete checkpoint is step 1"
DAMAGES = {
    "flipped byte in a shard": (lambda c: _flip_byte(_shard(iteration_dir(c, 2))),
                                ["__0_", ".distcp is damaged: its sha256 differs", PREVIOUS, "--ckpt-step 1"]),
    "truncated shard": (lambda c: _truncate(_shard(iteration_dir(c, 2))), [".distcp is damaged", "bytes where manifest.json records", PREVIOUS]),
    "truncated .metadata": (lambda c: _truncate(iteration_dir(c, 2) / ".metadata"), ["/.metadata is damaged", PREVIOUS]),
    "deleted common.pt": (lambda c: (iteration_dir(c, 2) / "common.pt").unlink(), ["common.pt is missing", PREVIOUS]),
    "garbage common.pt": (lambda c: _garbage(iteration_dir(c, 2) / "common.pt"), ["common.pt is damaged", PREVIOUS]),
    "garbage manifest": (lambda c: (iteration_dir(c, 2) / "manifest.json").write_text("{oops"), ["manifest.json is corrupt", PREVIOUS]),
    "tracker of garbage": (lambda c: (c / TRACKER).write_text("two\n"), [f"{TRACKER} is corrupt", "'two'", "the latest complete checkpoint is step 2"]),
    "tracker not UTF-8": (lambda c: (c / TRACKER).write_bytes(b"\xff\xfe2\n"), [f"{TRACKER} is corrupt", "not UTF-8", "the latest complete checkpoint is step 2"]),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_named_with_the_previous_one(two_checkpoints, tmp_path, capsys, damage):
    copy = _copy(two_checkpoints, tmp_path)
    corrupt, words = DAMAGES[damage]
    corrupt(copy)
    path = config_file(tmp_path, training=TWO_SAVES)
    code, err, _ = run_cli(capsys, "pretrain", "--config", str(path), "--load", str(copy))
    assert_one_error_line(code, err, *words)


def test_previous_checkpoint_loads_with_ckpt_step(two_checkpoints, tmp_path):
    copy = _copy(two_checkpoints, tmp_path)
    _flip_byte(_shard(iteration_dir(copy, 2)))
    trainer = Trainer(tiny_config(tmp_path, training=TWO_SAVES, checkpoint={"load": str(copy), "ckpt_step": 1}))
    assert trainer.state.iteration == 1


def test_flipped_byte_would_change_the_weights(two_checkpoints, tmp_path):
    """Without the manifest, the same flipped byte loads silently into other weights: what
    the checksums catch."""
    copy = _copy(two_checkpoints, tmp_path)
    intact = weights(Trainer(tiny_config(tmp_path / "a", training=TWO_SAVES, checkpoint={"load": str(copy)})))
    for manifest in copy.glob("*/manifest.json"):
        manifest.unlink()
    # a byte inside the item table's values (where the dist checkpoint's metadata puts
    # them), in the model's copy and in the distributed optimizer's fp32 one it restores
    directory = iteration_dir(copy, 2)
    storage = FileSystemReader(str(directory)).read_metadata().storage_data
    for index, where in storage.items():
        if index.fqn in ("item_table.weight", "optimizer.state.param.item_table.weight"):
            _flip_byte(directory / where.relative_path, offset=where.offset + where.length // 2)
    changed = weights(Trainer(tiny_config(tmp_path / "b", training=TWO_SAVES, checkpoint={"load": str(copy)})))
    assert not (changed["item_table.weight"] == intact["item_table.weight"]).all()


def test_damaged_dynamic_table_file_is_named(megatron_cpu, tmp_path):
    ckpt = _two_saves(tmp_path, embeddings=DYNAMIC)
    rows = sorted(iteration_dir(ckpt, 2).glob("dynamic_embeddings/*/rank_00000.pt"))
    assert rows, "the dynamic table wrote no rows file"
    _flip_byte(rows[0])
    with pytest.raises(CheckpointError, match=r"dynamic_embeddings/.*/rank_00000.pt is damaged.*previous complete checkpoint is step 1"):
        Trainer(tiny_config(tmp_path / "load", training=TWO_SAVES, embeddings=DYNAMIC, checkpoint={"load": str(ckpt)}))
    manifest = json.loads((iteration_dir(ckpt, 1) / "manifest.json").read_text())
    assert any(name.startswith("dynamic_embeddings/") for name in manifest["files"])
