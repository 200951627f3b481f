"""``megatron-gr checkpoint reshard``: a single-rank checkpoint rewritten offline for
tensor 2 x pipeline 2 and for context 2 x data 2 (the tool spawns 4 gloo ranks), then
loaded under that layout (4 ranks through the multi-rank harness), evaluates to the
single-rank metrics and trains on with the single-rank losses; its files are those a
4-rank run writes."""

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
    assert report["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                "context_parallel_size": 1}
    assert report["train_state"]["resharded_from"]["tensor_model_parallel_size"] == 1
    assert report["train_state"]["consumed_samples"] == describe(source)["train_state"]["consumed_samples"]
    assert report["tensors"] == describe(source)["tensors"]
    assert len(list((tmp_path / "tp2pp2" / "iter_0000003").glob("__*_0.distcp"))) == 4  # one file per rank
    line = reshard(source, tmp_path / "cp2dp2", tensor=1, pipeline=1, context=2, data=2)
    assert "tensor 1 x context 2 x pipeline 1 x data 2 (4 ranks)" in line
    assert describe(tmp_path / "cp2dp2")["layout"]["context_parallel_size"] == 2
    runs = launch(tmp_path, 4, [
        resuming("resharded", config(tmp_path, "resharded", tp=2, pp=2, load=tmp_path / "tp2pp2")),
        resuming("resharded_cp", config(tmp_path, "resharded_cp", load=tmp_path / "cp2dp2", context_parallel_size=2,
                                        context_parallel_split_threshold=8)),
    ])
    for resumed in runs.values():
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


def test_fp8_checkpoints_reshard_on_the_cpu(tmp_path):
    """An FP8 run's config cannot be planned on the CPU; the tool's ranks build it with plain
    linears (FP8 linears keep nothing in checkpoints), the rest of the model unchanged."""
    from megatron_gr.checkpoint_tools.reshard import _build_config
    from megatron_gr.config.errors import ConfigError
    from megatron_gr.training.plan import make_plan
    from tests.unit.training.helpers import tiny_config

    saved = tiny_config(tmp_path, model={"fp8": "hybrid", "fp8_amax_history_len": 4})
    with pytest.raises(ConfigError, match="fp8"):
        make_plan(saved, num_items=80, world_size=1)
    built = _build_config(saved)
    assert built.model.fp8 is None and built.model.fp8_amax_history_len == 1
    assert built.model.num_layers == saved.model.num_layers and built.model.hidden_size == saved.model.hidden_size
    make_plan(built, num_items=80, world_size=1)
