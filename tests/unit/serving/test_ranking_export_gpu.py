"""``megatron-gr export`` of the ranking models on a GPU (the CPU tests are in
test_ranking_export.py): trained and exported on CUDA with the run's defaults."""

from __future__ import annotations

import pytest
import torch
import yaml

from megatron_gr.models.ranking.serving import requests_of
from tests.support.parity import assert_close_to_scale
from tests.unit.serving.test_ranking_export import MODELS, _call, _config, _evaluation


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_program_on_a_gpu_scores_as_evaluation(tmp_path, name):
    """On CUDA with the run's defaults (bf16, kernel backend auto, so evaluation runs the
    Triton kernels; ULTRA-HSTU's channels on CUDA streams in training, one after another in
    the traced program): the exported program (the PyTorch ops: Triton kernels are not
    traceable) runs on CUDA and its scores equal the evaluation's within bf16 rounding (1e-2
    of the largest)."""
    from megatron_gr.config import ExperimentConfig, resolve_config
    from megatron_gr.serving import export_program
    from megatron_gr.training.trainer import Trainer

    raw = _config(tmp_path, name, save=str(tmp_path / "run"))
    raw["training"]["device"] = "cuda"
    Trainer(ExperimentConfig.from_dict(raw)).train()
    raw["checkpoint"] = {"load": str(tmp_path / "run")}
    (tmp_path / "ranking.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    export_program(resolve_config(str(tmp_path / "ranking.yaml"), []), out=tmp_path / "ranking.pt2")
    program = torch.export.load(tmp_path / "ranking.pt2").module()
    trainer, model, batches = _evaluation(tmp_path)
    assert trainer.plan.backend == "triton"  # evaluation on the kernels, the program on the PyTorch ops
    for batch in batches:
        batch = batch.to("cuda")
        with torch.no_grad():
            expected = model(batch).scores.float()
        assert_close_to_scale(_call(program, requests_of(batch)), expected, rtol=1e-2, what="candidate scores (bf16)")
