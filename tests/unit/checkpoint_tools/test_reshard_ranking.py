"""``megatron-gr checkpoint reshard`` of the ranking models: a single-rank DLRM-HSTU
checkpoint and a single-rank ULTRA-HSTU one (two channels with truncation) rewritten
offline for tensor 2 x pipeline 2 (the model rebuilt from the checkpoint alone: the
ranking spec's ``checkpoint_dataset``), then loaded under that layout (4 gloo ranks, one
launch), evaluate to the single-rank metrics and train on with the single-rank losses."""

from __future__ import annotations

import pytest

from megatron_gr.checkpoint_tools import describe
from megatron_gr.checkpoint_tools.reshard import reshard
from tests.unit.parallel.layouts import AFTER, LOSS_RTOL, STEPS, assert_rank_metrics_close, launch, resuming, saving
from tests.unit.parallel.ranking_layouts import DYNAMIC, dlrm_config, ultra_config
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow

MODELS = {"dlrm_hstu": dlrm_config, "ultra_hstu": ultra_config}


def test_resharded_ranking_checkpoints_load_under_the_new_layout_with_the_same_metrics(megatron_cpu, tmp_path):
    references, resumed = {}, []
    for name, config in MODELS.items():
        source = tmp_path / f"{name}_single"
        references[name] = run_scenario(saving(f"{name}_single", config(tmp_path, f"{name}_single", save=source)))
        line = reshard(source, tmp_path / f"{name}_tp2pp2", tensor=2, pipeline=2)
        assert "tensor 2 x pipeline 2 x data 1 (4 ranks)" in line
        report = describe(tmp_path / f"{name}_tp2pp2")
        assert report["iteration"] == STEPS and report["tensors"] == describe(source)["tensors"]
        assert report["layout"]["tensor_model_parallel_size"] == 2 and report["layout"]["pipeline_model_parallel_size"] == 2
        resumed.append(resuming(name, config(tmp_path, f"{name}_resharded", tp=2, pp=2, load=tmp_path / f"{name}_tp2pp2")))
    runs = launch(tmp_path, 4, resumed)
    for name, reference in references.items():
        run = runs[name]
        assert run["start_iteration"] == STEPS
        assert_rank_metrics_close(run["valid"], reference["valid"])
        assert 0.0 < reference["valid"]["auc"] < 1.0
        assert run["losses"] == pytest.approx(reference["losses"][STEPS:STEPS + AFTER], rel=LOSS_RTOL)


def test_the_ranking_stand_in_holds_the_saved_table_rows(megatron_cpu, tmp_path):
    """Plain tables get the checkpoint's rows (a model of other rows is refused on load);
    a dynamic table, whose rows are keyed by raw ids, gets a stand-in."""
    from megatron_gr.config import ExperimentConfig
    from megatron_gr.models.registry import get_train_spec

    raw = dlrm_config(tmp_path, "stand_in", tables=DYNAMIC)
    saved = ExperimentConfig.from_dict(raw)
    facts = {"model_type": "DLRMHSTUModel", "table_rows": {"topic": 4, "segment": 7, "activity": 5}}
    stand_in = get_train_spec("ranking").checkpoint_dataset(saved, facts)
    assert stand_in.table_rows() == {"item": 2, "topic": 4, "segment": 7, "activity": 5}
    assert stand_in.vocabulary("item").tolist() == [1]
