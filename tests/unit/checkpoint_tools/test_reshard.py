"""``megatron-gr checkpoint reshard``: a single-rank checkpoint rewritten offline for
tensor 2 x pipeline 2 (the tool spawns 4 gloo ranks), then loaded under that layout
(4 ranks through the multi-rank harness), evaluates to the single-rank metrics and trains
on with the single-rank losses; its files are those a 4-rank run writes."""

from __future__ import annotations

import pytest

from megatron_gr.checkpoint_tools import describe
from megatron_gr.checkpoint_tools.reshard import reshard
from tests.unit.parallel.layouts import AFTER, LOSS_RTOL, STEPS, config, launch, resuming, saving
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow


def test_resharded_checkpoint_loads_under_the_new_layout_with_the_same_metrics(megatron_cpu, tmp_path):
    source = tmp_path / "single"
    reference = run_scenario(saving("single", config(tmp_path, "single", save=source)))
    line = reshard(source, tmp_path / "tp2pp2", tensor=2, pipeline=2)
    assert "tensor 2 x pipeline 2 x data 1 (4 ranks)" in line
    report = describe(tmp_path / "tp2pp2")
    assert report["iteration"] == STEPS
    assert report["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1}
    assert report["train_state"]["resharded_from"]["tensor_model_parallel_size"] == 1
    assert report["train_state"]["consumed_samples"] == describe(source)["train_state"]["consumed_samples"]
    assert report["tensors"] == describe(source)["tensors"]
    assert len(list((tmp_path / "tp2pp2" / "iter_0000003").glob("__*_0.distcp"))) == 4  # one file per rank
    resumed = launch(tmp_path, 4, [
        resuming("resharded", config(tmp_path, "resharded", tp=2, pp=2, load=tmp_path / "tp2pp2")),
    ])["resharded"]
    assert resumed["start_iteration"] == STEPS
    assert resumed["valid"] == pytest.approx(reference["valid"], rel=1e-6)
    assert resumed["losses"] == pytest.approx(reference["losses"][STEPS:STEPS + AFTER], rel=LOSS_RTOL)


def test_reshard_writes_the_requested_dtype(megatron_cpu, tmp_path):
    import torch

    from tests.unit.checkpoint_tools.helpers import all_entries, train_and_save

    source = train_and_save(tmp_path, "ckpt")
    reshard(source, tmp_path / "bf16", tensor=1, pipeline=1, dtype=torch.bfloat16)
    before, after = all_entries(source), all_entries(tmp_path / "bf16")
    weight = "decoder.layers.uvqk_proj.weight"
    assert after[weight].dtype == torch.bfloat16
    assert torch.equal(after[weight], before[weight].to(torch.bfloat16))
    state = "optimizer.state.exp_avg." + weight
    assert after[state].dtype == torch.float32 and torch.equal(after[state], before[state])  # optimizer state keeps fp32
    assert describe(tmp_path / "bf16")["tensors"][weight]["dtype"] == "bfloat16"
