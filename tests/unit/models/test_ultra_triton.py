"""ULTRA-HSTU on the Triton kernels equals the same model on the PyTorch references: a
two-channel model (semi-local attention, attention truncation, U/V/Q/K and norm
rematerialization, dropout on) gives the same candidate scores, training losses and
parameter gradients. On a GPU the two channels run on separate CUDA streams, so this also
checks the streams' synchronisation. CPU: Triton interpreter, fp32; GPU: bf16."""

from __future__ import annotations

import numpy as np
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.data.ranking.channel_batches import make_channel_batch  # noqa: E402
from megatron_gr.embeddings.builder import build_table  # noqa: E402
from megatron_gr.models.registry import get_train_spec  # noqa: E402
from megatron_gr.models.ultra.model import UltraHSTUModel  # noqa: E402
from megatron_gr.ops.backend import KernelBackend  # noqa: E402
from megatron_gr.training.plan import make_plan  # noqa: E402
from tests.unit.models.test_ultra_model import CLICK, IMP, TWO_CHANNELS, tiny  # noqa: E402


def model_on(backend: KernelBackend, config, dataset, plan) -> UltraHSTUModel:
    names = list(config.embeddings)
    tables = {
        name: build_table(name, config.embeddings[name], plan.model_config, num_embeddings=dataset.table_rows()[name],
                          seed=plan.seed, device=torch.device(DEVICE), backend=backend)
        for name in names
    }
    return UltraHSTUModel(plan.model_config, config.ranking, tables,
                          table_dims={n: config.embeddings[n].dim for n in names}, backend=backend, init_seed=plan.seed)


def test_triton_ultra_model_matches_pytorch(megatron_runtime, tmp_path):  # noqa: F811
    model = {"transducers": TWO_CHANNELS, "recompute_uvqk": True, "recompute_normed_x": True,
             "hidden_dropout": 0.2, "embedding_dropout": 0.2}
    config = tiny(tmp_path, model=model, features={**IMP, **CLICK})
    dataset = get_train_spec("ranking").build_dataset(config)
    plan = make_plan(config, table_rows=dataset.table_rows(), world_size=1)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    chunk = np.arange(6)
    batch = make_channel_batch(dataset.channels, chunk, key_base=chunk, dropout_seed=11).to(DEVICE)
    results = {}
    for backend in (KernelBackend.PYTORCH, KernelBackend.TRITON):
        ultra = model_on(backend, config, dataset, plan).to(DEVICE, dtype)  # keyed init: the same weights
        ultra.eval()
        with torch.no_grad():
            scores = ultra(batch).scores
        ultra.train()
        losses = ultra(batch)
        losses.sum().backward()
        results[backend] = [scores, losses, *(p.grad for p in ultra.parameters())]
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for i, (got, want) in enumerate(zip(results[KernelBackend.TRITON], results[KernelBackend.PYTORCH])):
        error = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
        assert error < tolerance, f"output {i}: relative error {error:.2e}"
