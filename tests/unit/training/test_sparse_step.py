"""The joint step of megatron's dense optimizer and the dynamic tables: one gradient norm,
one clipping factor, the dense learning rate, per-token scaling, skipped steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection
from megatron_gr.training.sparse_step import SparseTables, with_sparse_gradient_scaling


class DenseOptimizer:
    """The part of megatron's optimizer interface the joint step uses: one parameter whose
    gradient norm is 3; a plain SGD step at the scheduled learning rate."""

    def __init__(self, clip_grad: float, finite: bool = True):
        self.param = torch.nn.Parameter(torch.zeros(2))
        self.param.grad = torch.tensor([3.0, 0.0])
        self.config = SimpleNamespace(clip_grad=clip_grad)
        self.param_groups = [{"lr": 0.5}]
        self.finite = finite

    def prepare_grads(self) -> bool:
        return not self.finite

    def get_grad_norm(self) -> float:
        return float(self.param.grad.norm())

    def get_parameters(self):
        return [self.param]

    def step_with_ready_grads(self) -> bool:
        with torch.no_grad():
            self.param -= self.param_groups[0]["lr"] * self.param.grad
        return True


def _model_with_table():
    config = EmbeddingTableConfig(
        dim=2, type="dynamic", init_std=0.1,
        dynamic=DynamicTableConfig(capacity=64, bucket_size=8, optimizer="sgd", seed=1),
    )
    model = torch.nn.Module()
    model.table = DynamicEmbeddingCollection({"item": config}, default_seed=0, device=torch.device("cpu"))
    return model


def _touch(model, gradient: list[float]) -> torch.Tensor:
    rows = model.table.lookup("item", torch.tensor([7], dtype=torch.int64))
    (rows * torch.tensor([gradient])).sum().backward()
    return rows.detach()[0]


def test_rows_share_the_dense_norm_clipping_and_learning_rate(megatron_cpu):
    model = _model_with_table()
    tables = SparseTables([model])
    before = _touch(model, [0.0, 8.0])  # row gradient norm 8 ...
    tables.tables[0].scale_gradients(0.5)  # ... 4 after the per-token scaling
    optimizer = DenseOptimizer(clip_grad=1.0)
    updated, norm = tables.step(optimizer)
    assert updated and math.isclose(norm, 5.0)  # sqrt(3^2 + 4^2)
    clip = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(optimizer.param.detach(), torch.tensor([-0.5 * 3.0 * clip, 0.0]))
    after = model.table.lookup("item", torch.tensor([7])).detach()[0]
    torch.testing.assert_close(after, before - 0.5 * torch.tensor([0.0, 4.0]) * clip)  # the dense lr


def test_finalize_divides_row_gradients_by_the_token_count(megatron_cpu):
    model = _model_with_table()
    tables = SparseTables([model])
    calls = []
    finalize = with_sparse_gradient_scaling(lambda m, n, **kw: calls.append(int(n)), tables.tables)
    _touch(model, [0.0, 8.0])
    finalize([model], torch.tensor(4))
    assert calls == [4]
    assert math.isclose(float(tables.tables[0].gradient_square_sum()), 4.0)  # (8 / 4)^2


def test_a_skipped_step_moves_no_row(megatron_cpu):
    model = _model_with_table()
    tables = SparseTables([model])
    before = _touch(model, [1.0, 1.0])
    updated, norm = tables.step(DenseOptimizer(clip_grad=1.0, finite=False))
    assert not updated and norm is None
    assert tables.tables[0].step == 0
    torch.testing.assert_close(model.table.lookup("item", torch.tensor([7])).detach()[0], before)
