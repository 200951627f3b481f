"""``megatron-gr checkpoint convert`` and ``inspect``: a checkpoint to one file and back is
the same checkpoint (every tensor and dynamic-table row identical), the file holds a
single-rank model's state dict, a lossless copy resumes exactly as the source does, a
weights-only copy starts a run at step 0 from the same weights, and inspect reports what
the checkpoint holds."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_gr.checkpoint_tools import convert, read_file
from megatron_gr.training.model_setup import unwrap
from tests.unit.checkpoint_tools.helpers import (
    DYNAMIC,
    all_entries,
    assert_equal_tensors,
    loaded_trainer,
    resume_losses,
    train_and_save,
)
from tests.unit.training.checkpoint_helpers import run_cli


@pytest.fixture(scope="module")
def plain(megatron_cpu, tmp_path_factory):
    return train_and_save(tmp_path_factory.mktemp("plain"), "ckpt")


@pytest.fixture(scope="module")
def dynamic(megatron_cpu, tmp_path_factory):
    return train_and_save(tmp_path_factory.mktemp("dynamic"), "ckpt", embeddings=DYNAMIC)


def _model_keys(entries: dict) -> list[str]:
    return [k for k, v in entries.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("with_optimizer", [False, True], ids=["weights", "lossless"])
def test_round_trip_gives_identical_tensors(plain, tmp_path, suffix, with_optimizer):
    file, back = tmp_path / f"model{suffix}", tmp_path / "back"
    convert(plain, file, with_optimizer=with_optimizer)
    convert(file, back)
    source, copy = all_entries(plain), all_entries(back)
    tensors = [k for k, v in source.items() if isinstance(v, torch.Tensor)]
    if with_optimizer:
        assert_equal_tensors(copy, source, tensors)  # model and optimizer state
        assert copy["__common__"]["train_state"] == {**source["__common__"]["train_state"], "fresh_rng": True}
        assert copy["__common__"]["optimizer"] == source["__common__"]["optimizer"]
        assert copy["__common__"]["scheduler"] == source["__common__"]["scheduler"]
    else:
        assert_equal_tensors(copy, source, _model_keys(source))
        assert not any(k.startswith("optimizer.") for k in copy)
        assert copy["__common__"]["train_state"]["weights_only"] is True
        assert copy["__common__"]["train_state"]["source_iteration"] == 3
    objects = [k for k in source if "_extra_state" in k]
    assert objects and all(k in copy for k in objects)
    assert not any(k.startswith("rng_state") for k in copy), "RNG states are layout-bound and not carried"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("with_optimizer", [False, True], ids=["weights", "lossless"])
def test_dynamic_table_rows_survive_the_round_trip(dynamic, tmp_path, suffix, with_optimizer):
    file, back = tmp_path / f"model{suffix}", tmp_path / "back"
    convert(dynamic, file, with_optimizer=with_optimizer)
    convert(file, back)
    source, copy = all_entries(dynamic)["__dynamic__"]["item"], all_entries(back)["__dynamic__"]["item"]
    assert source["rows"]["keys"].numel() > 0
    for field, values in source["rows"].items():
        assert torch.equal(copy["rows"][field], values), field
    if with_optimizer:
        for field, values in source["optimizer"].items():
            assert torch.equal(copy["optimizer"][field], values), field
    else:
        assert "optimizer" not in copy


def test_file_holds_a_single_rank_state_dict(megatron_cpu, tmp_path):
    """The weights load into a one-rank model with ``load_state_dict`` as they are."""
    save = train_and_save(tmp_path, "ckpt")
    convert(save, tmp_path / "model.pt")
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    trainer, _ = resume_losses(tmp_path, save, "resumed", total=3)
    model = unwrap(trainer.model[0])
    state = model.state_dict()
    assert set(raw["weights"]) | set(raw["objects"]) == set(state)
    for name, tensor in raw["weights"].items():
        assert torch.equal(tensor, state[name]), name
    fresh = {name: torch.zeros_like(t) for name, t in raw["weights"].items()}
    model.load_state_dict({**fresh, **raw["objects"]})
    model.load_state_dict({**raw["weights"], **raw["objects"]})
    assert all(torch.equal(state[name], t) for name, t in raw["weights"].items())


def test_lossless_copy_resumes_exactly_like_the_source(megatron_cpu, tmp_path):
    save = train_and_save(tmp_path, "ckpt")
    convert(save, tmp_path / "model.safetensors", with_optimizer=True)
    convert(tmp_path / "model.safetensors", tmp_path / "back")
    _, expected = resume_losses(tmp_path, save, "source")
    trainer, losses = resume_losses(tmp_path, tmp_path / "back", "copy")
    assert len(losses) == 2 and losses == expected
    assert trainer.state.consumed_samples == 5 * 16


def test_weights_only_copy_starts_a_run_at_step_0_from_the_same_weights(plain, tmp_path):
    convert(plain, tmp_path / "model.pt")
    convert(tmp_path / "model.pt", tmp_path / "back")
    trainer = loaded_trainer(tmp_path, tmp_path / "back", "copy")
    assert trainer.state.iteration == 0 and trainer.state.consumed_samples == 0
    model = unwrap(trainer.model[0]).state_dict()
    weights = read_file(tmp_path / "model.pt").weights
    for name, tensor in weights.items():
        assert torch.equal(model[name], tensor), name
    assert trainer.train_step()["loss"] > 0


def test_bf16_weights(plain, tmp_path):
    convert(plain, tmp_path / "model.safetensors", dtype=torch.bfloat16)
    content = read_file(tmp_path / "model.safetensors")
    source = all_entries(plain)
    assert content.weights["decoder.layers.1.uvqk_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(content.weights["decoder.layers.1.uvqk_proj.weight"],
                       source["decoder.layers.uvqk_proj.weight"][1].to(torch.bfloat16))
    convert(tmp_path / "model.safetensors", tmp_path / "back", dtype=torch.float32)
    back = all_entries(tmp_path / "back")
    assert torch.equal(back["item_table.weight"], source["item_table.weight"].to(torch.bfloat16).float())


def test_inspect_reports_step_layout_tensors_and_dynamic_rows(dynamic, capsys):
    code, err, out = run_cli(capsys, "checkpoint", "inspect", str(dynamic), "--json")
    assert code == 0, err
    report = json.loads(out)
    entries = all_entries(dynamic)
    assert report["iteration"] == 3 and report["kind"] == "training checkpoint"
    assert report["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "data_parallel_size": 1,
                                "context_parallel_size": 1}
    assert report["tensors"] == {k: {"shape": list(entries[k].shape), "dtype": "float32"} for k in _model_keys(entries)}
    assert report["dynamic_tables"]["item"]["rows"] == entries["__dynamic__"]["item"]["rows"]["keys"].numel()
    assert report["config"]["embeddings"]["item"]["type"] == "dynamic"
    code, err, text = run_cli(capsys, "checkpoint", "inspect", str(dynamic))
    assert code == 0, err
    assert "step 3" in text and "tensor 1 x pipeline 1 x data 1" in text
    assert "decoder.layers.uvqk_proj.weight" in text and "[2, 64, 16]" in text
    assert f"rows={report['dynamic_tables']['item']['rows']}" in text


def test_inspect_a_converted_file(plain, tmp_path, capsys):
    convert(plain, tmp_path / "model.pt", with_optimizer=True)
    code, err, out = run_cli(capsys, "checkpoint", "inspect", str(tmp_path / "model.pt"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "converted file with optimizer state" and report["iteration"] == 3
    assert report["tensors"]["decoder.layers.0.uvqk_proj.weight"] == {"shape": [64, 16], "dtype": "float32"}
    assert report["optimizer_tensors"] > 0
