"""Bad input to the checkpoint tools is one ``error:`` line (exit code 2) and writes
nothing: not a checkpoint, damaged or foreign files, an existing --out, a file name of
another kind, a layout the model cannot take."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.checkpoint_tools import convert
from tests.unit.checkpoint_tools.helpers import train_and_save
from tests.unit.training.checkpoint_helpers import assert_one_error_line, run_cli


@pytest.fixture(scope="module")
def saved(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    save = train_and_save(tmp, "ckpt")
    convert(save, tmp / "model.pt")
    convert(save, tmp / "model.safetensors")
    return save


def _nothing_written(directory, out) -> None:
    assert not out.exists()
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")], "a temporary output was left behind"


def _truncated_copy(source, target):
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize("verb", ["inspect", "convert"])
def test_not_a_checkpoint(saved, tmp_path, capsys, verb):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.pt"
    extra = ["--out", str(out)] if verb == "convert" else []
    code, err, _ = run_cli(capsys, "checkpoint", verb, str(empty), *extra)
    assert_one_error_line(code, err, str(empty), "not a megatron_gr checkpoint")
    code, err, _ = run_cli(capsys, "checkpoint", verb, str(tmp_path / "missing"), *extra)
    assert_one_error_line(code, err, "does not exist")
    _nothing_written(tmp_path, out)


def test_damaged_checkpoint_file(saved, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    damaged = sorted((copy / "iter_0000003").glob("*.distcp"))[0]
    _truncated_copy(damaged, damaged)
    out = tmp_path / "out.safetensors"
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(copy), "--out", str(out))
    assert_one_error_line(code, err, damaged.name, "damaged")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_truncated_file(saved, tmp_path, capsys, name):
    truncated = _truncated_copy(saved.parent / name, tmp_path / name)
    out = tmp_path / "back"
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(truncated), "--out", str(out))
    assert_one_error_line(code, err, str(truncated), "truncated")
    _nothing_written(tmp_path, out)
    code, err, _ = run_cli(capsys, "checkpoint", "inspect", str(truncated))
    assert_one_error_line(code, err, str(truncated))


def test_foreign_torch_file(saved, tmp_path, capsys):
    foreign = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2)}, foreign)
    out = tmp_path / "back"
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(foreign), "--out", str(out))
    assert_one_error_line(code, err, "not a megatron_gr checkpoint file")
    _nothing_written(tmp_path, out)


def test_existing_out_is_never_overwritten(saved, tmp_path, capsys):
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(saved), "--out", str(out))
    assert_one_error_line(code, err, "already exists")
    assert out.read_bytes() == b"keep me"
    existing = tmp_path / "dir"
    existing.mkdir()
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(saved.parent / "model.pt"), "--out", str(existing))
    assert_one_error_line(code, err, "already exists")
    code, err, _ = run_cli(capsys, "checkpoint", "reshard", str(saved), "--out", str(existing),
                           "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1")
    assert_one_error_line(code, err, "already exists")
    assert list(existing.iterdir()) == []


def test_file_name_of_another_kind(saved, tmp_path, capsys):
    out = tmp_path / "model.bin"
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(saved), "--out", str(out))
    assert_one_error_line(code, err, ".pt", ".safetensors", "reshard")
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("tp, pp, words", [
    ("3", "1", ("num_attention_heads=2", "tensor_model_parallel_size=3")),
    ("1", "3", ("num_layers=2", "pipeline_model_parallel_size=3")),
    ("0", "1", ("--tensor-model-parallel-size=0",)),
])
def test_layout_the_model_cannot_take(saved, tmp_path, capsys, tp, pp, words):
    out = tmp_path / "resharded"
    code, err, _ = run_cli(capsys, "checkpoint", "reshard", str(saved), "--out", str(out),
                           "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp)
    assert_one_error_line(code, err, *words)
    _nothing_written(tmp_path, out)


def test_optimizer_state_of_best_weights(megatron_cpu, tmp_path, capsys):
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    save = tmp_path / "run"
    Trainer(tiny_config(tmp_path, training={"train_iters": 2, "lr_decay_iters": 2, "lr_warmup_iters": 0, "eval_interval": 2},
                        checkpoint={"save": str(save)})).train()
    out = tmp_path / "best.pt"
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(save / "best"), "--out", str(out), "--with-optimizer")
    assert_one_error_line(code, err, "best weights only")
    _nothing_written(tmp_path, out)
    code, err, _ = run_cli(capsys, "checkpoint", "convert", str(save / "best"), "--out", str(out))
    assert code == 0, err
