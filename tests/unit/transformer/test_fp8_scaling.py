"""FP8 scaling logic on the CPU against a simulated reference written out here: the amax
history (roll, max or most recent, margin, overflow and zeros), delayed against current
scaling, per-tensor and per-row operands (their scale shapes and their values, quantised
with ``tensor.to(torch.float8_*)`` and dequantised in float64)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gr.transformer.fp8.scaling import (
    AmaxHistory,
    quantize_per_column_transposed,
    quantize_per_row,
    quantize_per_tensor,
    scale_from_amax,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Leaves torch's global generator as it found it: later tests in the process draw
    their weights from it."""
    with torch.random.fork_rng():
        yield


def simulated_scale(amax: float, dtype, margin: int) -> float:
    return FP8_MAX[dtype] / amax / 2**margin


def simulated_quantize(x: torch.Tensor, scale, dtype) -> torch.Tensor:
    """The reference cast: scale in float32, saturate, torch's own conversion."""
    limit = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-limit, limit).to(dtype)


class ReferenceHistory:
    """The documented rules of AmaxHistory in plain Python."""

    def __init__(self, length, algo, dtype, margin):
        self.entries, self.length, self.algo, self.dtype, self.margin = [0.0] * length, length, algo, dtype, margin
        self.scale = 1.0

    def record(self, amax: float):
        if not math.isfinite(amax):
            return
        self.entries = [amax] + self.entries[:-1]
        reference = max(self.entries) if self.algo == "max" else self.entries[0]
        if reference > 0:
            self.scale = simulated_scale(reference, self.dtype, self.margin)


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("length,margin,dtype", [(1, 0, E4M3), (4, 1, E5M2), (7, 2, E4M3)])
def test_amax_history_rolls_and_scales_like_the_rules(algo, length, margin, dtype):
    history = AmaxHistory(length=length, compute_algo=algo, dtype=dtype, margin=margin)
    reference = ReferenceHistory(length, algo, dtype, margin)
    g = torch.Generator().manual_seed(length)
    amaxes = torch.exp2(torch.empty(40).uniform_(-10, 10, generator=g)).tolist()
    amaxes[5], amaxes[9], amaxes[10], amaxes[17] = float("inf"), float("nan"), 0.0, float("-inf")
    for step, amax in enumerate(amaxes):
        history.record(torch.tensor(amax))
        reference.record(amax)
        assert history.history.tolist() == pytest.approx(reference.entries, rel=1e-6), step
        assert history.scale.item() == pytest.approx(reference.scale, rel=1e-6), step


def test_amax_history_starts_at_scale_one_and_ignores_zero_and_overflow():
    history = AmaxHistory(length=3, compute_algo="max", dtype=E4M3, margin=0)
    for amax in (0.0, float("nan"), float("inf")):
        history.record(torch.tensor(amax))
        assert history.scale.item() == 1.0
    assert history.history.tolist() == [0.0, 0.0, 0.0]  # the zero rolled in; the overflows did not


def test_scale_from_amax_with_margin():
    amax = torch.tensor([3.0, 0.0, 1e-20])
    scale = scale_from_amax(amax, dtype=E4M3, margin=2)
    assert scale[0].item() == pytest.approx(448.0 / 3.0 / 4.0)
    assert torch.isfinite(scale).all()  # zero and tiny amaxes give a large, finite scale


def test_current_scaling_uses_the_tensors_own_amax():
    x = torch.randn(33, 48) * 7
    operand, transposed = quantize_per_tensor(x, dtype=E4M3, margin=1, group=None, kernel="pytorch", transposed=True,
                                              pad_to=16)
    scale = simulated_scale(x.abs().max().item(), E4M3, 1)
    assert torch.equal(operand.data.float(), simulated_quantize(x, torch.tensor(scale), E4M3).float())
    assert operand.scale_inv.shape == (1,) and operand.scale_inv.item() == pytest.approx(1 / scale, rel=1e-6)
    assert transposed.data.shape == (48, 48) and torch.equal(transposed.data[:, :33].float(), operand.data.t().float())
    assert torch.equal(transposed.data[:, 33:].float(), torch.zeros(48, 15))
    # the dequantised values are x to e4m3 precision (3 mantissa bits: relative error <= 2^-4)
    error = (operand.data.double() * operand.scale_inv.double() - x.double()).abs()
    assert (error <= x.double().abs() * 2**-4 + 2**-9 / scale).all()


def test_delayed_scaling_first_call_current_then_previous_amaxes():
    history = AmaxHistory(length=2, compute_algo="max", dtype=E5M2, margin=0)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(20, 16, generator=g) * s for s in (1.0, 4.0, 0.5, 0.5)]
    amaxes = [t.abs().max().item() for t in tensors]
    for step, x in enumerate(tensors):
        operand, _ = quantize_per_tensor(x, dtype=E5M2, margin=0, group=None, kernel="pytorch", history=history)
        if step == 0:
            expected_scale = simulated_scale(amaxes[0], E5M2, 0)  # no history yet: current scaling
        else:
            expected_scale = simulated_scale(max(amaxes[max(0, step - 2):step]), E5M2, 0)
        assert operand.scale_inv.item() == pytest.approx(1 / expected_scale, rel=1e-6), step
        assert torch.equal(operand.data.float(), simulated_quantize(x, torch.tensor(expected_scale), E5M2).float())
    # step 1 grew 4x past the scale of step 0: its largest values saturate
    history = AmaxHistory(length=1, compute_algo="max", dtype=E4M3, margin=0)
    quantize_per_tensor(tensors[0], dtype=E4M3, margin=0, group=None, kernel="pytorch", history=history)
    grown, _ = quantize_per_tensor(tensors[1], dtype=E4M3, margin=0, group=None, kernel="pytorch", history=history)
    assert grown.data.float().abs().max().item() == 448.0


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_overflow_gives_nan_scale_and_leaves_the_history(poison):
    history = AmaxHistory(length=4, compute_algo="max", dtype=E4M3, margin=0)
    x = torch.randn(16, 16)
    quantize_per_tensor(x, dtype=E4M3, margin=0, group=None, kernel="pytorch", history=history)
    before_history, before_scale = history.history.clone(), history.scale.clone()
    bad = x.clone()
    bad[3, 4] = poison
    operand, _ = quantize_per_tensor(bad, dtype=E4M3, margin=0, group=None, kernel="pytorch", history=history)
    assert torch.isnan(operand.scale_inv).all()  # the GEMM output becomes NaN: the overflow shows
    assert torch.equal(history.history, before_history) and torch.equal(history.scale, before_scale)
    current, _ = quantize_per_tensor(bad, dtype=E4M3, margin=0, group=None, kernel="pytorch")
    assert torch.isnan(current.scale_inv).all()
    clean, _ = quantize_per_tensor(x, dtype=E4M3, margin=0, group=None, kernel="pytorch", history=history)
    assert torch.isfinite(clean.scale_inv).all()


def test_rowwise_operands_scale_shapes_and_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 32, generator=g) * torch.exp2(torch.randint(-6, 6, (21, 1), generator=g).float())
    x[4] = 0.0  # an all-zero row keeps a finite scale
    rows = quantize_per_row(x, dtype=E4M3, margin=0, group=None, kernel="pytorch")
    assert rows.data.shape == (21, 32) and rows.scale_inv.shape == (21, 1)
    row_scale = FP8_MAX[E4M3] / x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    assert torch.equal(rows.data.float(), simulated_quantize(x, row_scale, E4M3).float())
    assert torch.allclose(rows.scale_inv, 1 / row_scale, rtol=1e-6) and torch.isfinite(rows.scale_inv).all()

    columns = quantize_per_column_transposed(x, dtype=E5M2, margin=0, group=None, kernel="pytorch", pad_to=16)
    assert columns.data.shape == (32, 32) and columns.scale_inv.shape == (32, 1)
    column_scale = FP8_MAX[E5M2] / x.abs().amax(dim=0, keepdim=True)
    assert torch.equal(columns.data[:, :21].float(), simulated_quantize(x, column_scale, E5M2).t().float())
    assert torch.equal(columns.data[:, 21:].float(), torch.zeros(32, 11))
    assert torch.allclose(columns.scale_inv.view(-1), 1 / column_scale.view(-1), rtol=1e-6)

    bad = x.clone()
    bad[7, 3] = float("inf")
    poisoned = quantize_per_row(bad, dtype=E4M3, margin=0, group=None, kernel="pytorch")
    assert torch.isnan(poisoned.scale_inv[7]).all() and torch.isfinite(poisoned.scale_inv[torch.arange(21) != 7]).all()


def test_per_tensor_transposed_operand_is_the_rows_transposed_and_padded():
    """The FP8 linear's weight gradient takes the input's transposed operand from the forward's cast."""
    x = torch.randn(5, 16)
    x[0, 0] = -1e-9  # rounds to -0: the sign must survive the transpose too
    operand, moved = quantize_per_tensor(x, dtype=E4M3, margin=0, group=None, kernel="pytorch", transposed=True,
                                         pad_to=16)
    assert moved.data.shape == (16, 16) and moved.data.is_contiguous() and moved.scale_inv is operand.scale_inv
    assert torch.equal(moved.data[:, :5].view(torch.uint8), operand.data.t().view(torch.uint8))
    assert torch.equal(moved.data[:, 5:].view(torch.uint8), torch.zeros(16, 11, dtype=torch.uint8))


def test_empty_tensors():
    empty = torch.zeros(0, 32)
    operand, transposed = quantize_per_tensor(empty, dtype=E4M3, margin=0, group=None, kernel="pytorch",
                                              transposed=True, pad_to=16)
    assert operand.data.shape == (0, 32) and transposed.data.shape == (32, 0)
    assert quantize_per_row(empty, dtype=E4M3, margin=0, group=None, kernel="pytorch").scale_inv.shape == (0, 1)
    assert quantize_per_column_transposed(empty, dtype=E4M3, margin=0, group=None, kernel="pytorch").data.shape == (32, 0)
