"""``megatron-gr export`` of HSTU retrieval on a GPU (the CPU tests are in test_export.py):
trained and exported on CUDA with the run's defaults."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.models.retrieval_head import item_vectors
from tests.support.parity import assert_close_to_scale
from tests.unit.serving.test_export import TRAINING, _evaluation, _inputs
from tests.unit.training.checkpoint_helpers import config_file
from tests.unit.training.helpers import tiny_config

TOP_K = 7


@pytest.mark.gpu
def test_program_on_a_gpu_scores_as_evaluation(tmp_path):
    """On CUDA with the run's defaults (bf16, kernel backend auto, so evaluation runs the
    Triton kernels): the exported program (the PyTorch ops) runs on CUDA and its user
    embeddings and top-k scores equal the evaluation's within bf16 rounding (1e-2 of the
    largest)."""
    from megatron_gr.cli import main
    from megatron_gr.training.trainer import Trainer

    training = {**TRAINING, "device": "cuda"}
    Trainer(tiny_config(tmp_path, training=training, checkpoint={"save": str(tmp_path / "run")})).train()
    yaml_path = config_file(tmp_path, training=training)
    assert main(["export", "--config", str(yaml_path), "--load", str(tmp_path / "run"),
                 "--out", str(tmp_path / "hstu.pt2"), "--top-k", str(TOP_K)]) == 0
    program = torch.export.load(tmp_path / "hstu.pt2").module()
    trainer, model, batches = _evaluation(tmp_path)
    assert trainer.plan.backend == "triton"  # evaluation on the kernels, the program on the PyTorch ops
    corpus = item_vectors(model.item_table, model.corpus_ids, normalize=True).float()
    for batch in batches:
        batch = batch.to("cuda")
        with torch.no_grad():
            expected_user = model.encode(batch)[batch.offsets[1:] - 1].float()
            user, scores, _ = program(*_inputs(model, batch))
        assert user.is_cuda
        assert_close_to_scale(user, expected_user, rtol=1e-2, what="user embeddings (bf16)")
        top = torch.topk(expected_user @ corpus.t(), TOP_K, dim=1)
        assert_close_to_scale(scores, top.values, rtol=1e-2, what="top-k scores (bf16)")
