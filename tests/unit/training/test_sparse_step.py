"""The joint step of megatron's dense optimizer and the dynamic tables: one gradient norm,
one clipping factor, the dense learning rate, per-token scaling, skipped steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection
from megatron_gr.training.sparse_step import SparseTables, per_token_finalize
from megatron_gr.training.step_verdict import HostVerdict


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


@pytest.mark.parametrize("clip_grad, scaled", [(6.0, False), (5.0 + 1e-5, False), (5.0, True), (4.0, True)])
def test_clipping_scales_only_below_the_clip_norm(megatron_cpu, clip_grad, scaled):
    """The dense gradient (norm 5 with the row) is scaled exactly when megatron would
    (clip / (norm + 1e-6) < 1), by megatron's factor; otherwise it is left as it is."""
    model = _model_with_table()
    tables = SparseTables([model])
    _touch(model, [0.0, 4.0])
    optimizer = DenseOptimizer(clip_grad=clip_grad)
    tables.step(optimizer)
    factor = clip_grad / (5.0 + 1e-6) if scaled else 1.0
    torch.testing.assert_close(optimizer.param.grad, torch.tensor([3.0, 0.0]) * factor, rtol=0, atol=0)


def test_a_device_factor_scales_rows_as_the_same_host_factor(megatron_cpu):
    """A tensor factor (the per-token one, read on the host only with the norm) gives the
    rows the same norm share and update as the same factor given as a float."""
    norms, rows = [], []
    device_factor = torch.tensor(1.0 / 3.0)  # float32, as the per-token factor is
    for factor in (float(device_factor), device_factor):
        model = _model_with_table()
        table = SparseTables([model]).tables[0]
        before = _touch(model, [0.7, 8.0])
        table.scale_gradients(factor)
        table.scale_gradients(0.3)  # then clipping's factor, on the host
        norms.append(float(table.gradient_square_sum()))
        table.apply_step(0.5)
        rows.append(model.table.lookup("item", torch.tensor([7])).detach()[0])
    assert norms[0] == norms[1] and torch.equal(rows[0], rows[1])
    assert not torch.equal(rows[0], before)


@pytest.mark.parametrize("tokens, factor", [(4, 0.25), (0, 1.0)])
def test_finalize_divides_dense_and_row_gradients_by_the_token_count(megatron_cpu, tokens, factor):
    model = _model_with_table()
    scaled = []
    model.scale_gradients = scaled.append  # a megatron DDP chunk's method
    tables = SparseTables([model])
    calls = []
    finalize = per_token_finalize(lambda m, n, **kw: calls.append(n), tables.tables)
    _touch(model, [0.0, 8.0])
    finalize([model], torch.tensor(tokens, dtype=torch.int))
    assert calls == [None]  # megatron reduces; the division is done on the device
    (dense,) = scaled
    assert torch.is_tensor(dense) and float(dense) == factor
    assert math.isclose(float(tables.tables[0].gradient_square_sum()), (8.0 * factor) ** 2)


def test_a_loss_read_at_the_synchronisation_point_decides(megatron_cpu):
    model = _model_with_table()
    tables = SparseTables([model])
    _touch(model, [1.0, 1.0])
    reads = []
    updated, _ = tables.step(DenseOptimizer(clip_grad=1.0), loss_is_finite=lambda: reads.append(1) or False)
    assert reads == [1] and not updated


def test_a_skipped_step_moves_no_row(megatron_cpu):
    model = _model_with_table()
    tables = SparseTables([model])
    before = _touch(model, [1.0, 1.0])
    updated, norm = tables.step(DenseOptimizer(clip_grad=1.0, finite=False))
    assert not updated and math.isclose(norm, math.sqrt(3.0**2 + 2.0))  # reported, not applied
    assert tables.tables[0].step == 0
    torch.testing.assert_close(model.table.lookup("item", torch.tensor([7])).detach()[0], before)


@pytest.mark.parametrize("cause", ["loss", "row gradient"])
def test_a_non_finite_loss_or_row_gradient_moves_nothing(megatron_cpu, cause):
    model = _model_with_table()
    tables = SparseTables([model])
    before = _touch(model, [float("nan"), 1.0] if cause == "row gradient" else [1.0, 1.0])
    optimizer = DenseOptimizer(clip_grad=1.0)
    updated, norm = tables.step(optimizer, loss_is_finite=cause != "loss")
    assert not updated and tables.tables[0].step == 0
    assert math.isnan(norm) if cause == "row gradient" else math.isfinite(norm)
    torch.testing.assert_close(optimizer.param.detach(), torch.zeros(2), rtol=0, atol=0)
    torch.testing.assert_close(model.table.lookup("item", torch.tensor([7])).detach()[0], before)


# ------------------------------------------------- with megatron's optimizer as main builds it
EPS = 10.0


def _trainer(tmp_path):
    """A tiny dynamic-table run on the default parallel settings (megatron's distributed
    optimizer, which takes only Adam). Adam's first step with an eps far above every
    gradient moves a weight by about lr x g / eps: linear in the clipped gradient. Rows use
    SGD at the dense lr (no warm-up). Clipping is active (gradient norms are far above 0.05)."""
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    return Trainer(tiny_config(
        tmp_path,
        model={"hidden_dropout": 0.0, "embedding_dropout": 0.0},
        embeddings={"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16, "optimizer": "sgd"}}},
        training={"clip_grad": 0.05, "lr_warmup_iters": 0, "lr": 0.1, "adam_eps": EPS},
    ))


def _rows(table) -> dict[int, torch.Tensor]:
    from megatron_gr.embeddings.dynamic.state import export_state

    state = export_state(table)
    return dict(zip(state["rows"]["keys"].tolist(), state["rows"]["weights"]))


def _backward(trainer) -> None:
    """What ``Trainer.train_step`` does before the optimizer step."""
    from megatron_gr.training.steps import forward_step_for

    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    batches = trainer.loader.next_step()
    trainer.forward_backward(
        forward_step_func=forward_step_for(trainer.spec, trainer.plan.device, training=True), data_iterator=iter(batches),
        model=trainer.model, num_microbatches=len(batches), seq_length=max(b.num_tokens for b in batches),
        micro_batch_size=1, forward_only=False,
    )


def test_joint_clipping_with_the_distributed_optimizer(megatron_cpu, tmp_path):
    """Dense weights (through megatron's ChainedOptimizer of a DistributedOptimizer) and rows
    move by lr x one clip factor x their gradient, the factor from their joint norm."""
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    trainer = _trainer(tmp_path)
    assert isinstance(trainer.optimizer, ChainedOptimizer)
    assert isinstance(trainer.optimizer.chained_optimizers[0], DistributedOptimizer)
    (table,) = trainer.sparse.tables
    _backward(trainer)  # the forward pass inserted the rows with their initial values
    params = [p for p in trainer.model[0].parameters()]
    dense_grads = [p.main_grad.detach().clone() for p in params]
    dense_before = [p.detach().clone() for p in params]
    sparse_square = float(table.gradient_square_sum())
    rows_before = _rows(table)
    lr = trainer.optimizer.param_groups[0]["lr"]
    updated, norm = trainer.sparse.step(trainer.optimizer)

    dense_square = sum(float(g.double().square().sum()) for g in dense_grads)
    assert updated and sparse_square > 0.01 * dense_square  # both parts weigh in the norm
    # fp32 sums over thousands of squares against float64 ones; leaving out the rows' share
    # (> 1% of the square) would move the norm by > 0.5%
    assert norm == pytest.approx(math.sqrt(dense_square + sparse_square), rel=1e-5)
    coefficient = 0.05 / (norm + 1e-6)
    for param, before, grad in zip(params, dense_before, dense_grads):
        clipped = coefficient * grad.double()
        expected = -lr * clipped / (clipped.abs() + EPS)  # Adam's first step
        # the fp32 weight holds the step to within half an ulp of the weight itself
        ulp = float(before.abs().max()) * 2.0**-23
        torch.testing.assert_close((param.detach() - before).double(), expected, rtol=1e-3, atol=ulp)
    rows_after = _rows(table)
    moved = sum(float((rows_after[k] - v).double().square().sum()) for k, v in rows_before.items())
    assert math.sqrt(moved) == pytest.approx(lr * coefficient * math.sqrt(sparse_square), rel=1e-4)


def test_a_skipped_megatron_step_moves_nothing(megatron_cpu, tmp_path, monkeypatch):
    """Non-finite gradients (megatron's prepare_grads says so; with a loss scaler it would,
    and such runs decide their steps on the host): neither weights nor rows move, the
    table's step count stays."""
    trainer = _trainer(tmp_path)
    trainer.verdict = HostVerdict(trainer.sparse)
    (table,) = trainer.sparse.tables
    trainer.train_step()
    prepare = trainer.optimizer.prepare_grads
    monkeypatch.setattr(trainer.optimizer, "prepare_grads", lambda: prepare() or True)
    weights = [p.detach().clone() for p in trainer.model[0].parameters()]
    rows = _rows(table)
    record = trainer.train_step()
    assert record["skipped"] and table.step == 1
    for param, before in zip(trainer.model[0].parameters(), weights):
        torch.testing.assert_close(param.detach(), before, rtol=0, atol=0)
    after = _rows(table)
    assert all(torch.equal(after[k], v) for k, v in rows.items() if k in after)
