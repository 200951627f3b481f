"""DLRM-HSTU on the Triton kernels (target-aware attention with contextual tokens, fused
output path, keyed dropout) equals the same model on the PyTorch references: candidate
scores, training losses and every parameter gradient, dropout on (the kernels draw the
reference's masks from the same keys). CPU: Triton interpreter, fp32; GPU: bf16 as
trained."""

from __future__ import annotations

import numpy as np
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.config import ExperimentConfig  # noqa: E402
from megatron_gr.data.ranking.loader import make_batch  # noqa: E402
from megatron_gr.embeddings.builder import build_table  # noqa: E402
from megatron_gr.models.ranking.model import DLRMHSTUModel  # noqa: E402
from megatron_gr.models.registry import get_train_spec  # noqa: E402
from megatron_gr.ops.backend import KernelBackend  # noqa: E402
from megatron_gr.training.plan import make_plan  # noqa: E402
from tests.unit.models.test_ranking_model import tiny  # noqa: E402


def model_on(backend: KernelBackend, config: ExperimentConfig, dataset, plan) -> DLRMHSTUModel:
    names = list(config.embeddings)
    tables = {
        name: build_table(name, config.embeddings[name], plan.model_config, num_embeddings=dataset.table_rows()[name],
                          seed=plan.seed, device=torch.device(DEVICE), backend=backend)
        for name in names
    }
    return DLRMHSTUModel(plan.model_config, config.ranking, tables, table_dims={n: config.embeddings[n].dim for n in names},
                         backend=backend, init_seed=plan.seed)


def test_triton_ranking_model_matches_pytorch(megatron_runtime, tmp_path):
    config = tiny(tmp_path, tower={"hidden_sizes": [8], "dropout": 0.2})
    config.model.hidden_dropout = config.model.embedding_dropout = 0.2
    dataset = get_train_spec("ranking").build_dataset(config)
    plan = make_plan(config, table_rows=dataset.table_rows(), world_size=1)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    keys = np.arange(6) * dataset.layout.max_seq_len  # a training batch's dropout keys
    batch = make_batch(dataset.data, dataset.layout, np.arange(6), key_base=keys, dropout_seed=11).to(DEVICE)
    results = {}
    for backend in (KernelBackend.PYTORCH, KernelBackend.TRITON):
        model = model_on(backend, config, dataset, plan).to(DEVICE, dtype)  # keyed init: the same weights
        model.eval()
        with torch.no_grad():
            scores = model(batch).scores
        model.train()
        losses = model(batch)
        grads = torch.autograd.grad(losses.sum(), list(model.parameters()))
        results[backend] = [scores, losses, *grads]
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for i, (got, want) in enumerate(zip(results[KernelBackend.TRITON], results[KernelBackend.PYTORCH])):
        error = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
        assert error < tolerance, f"output {i}: relative error {error:.2e}"
