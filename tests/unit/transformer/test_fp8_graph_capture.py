"""What makes the FP8 scaling replayable from CUDA graphs, on the CPU: the delayed recipe's
device-side first-quantisation rule gives the host rule's bits (operands, histories,
scales) on adversarial inputs; records update the state's own tensors (a replayed graph
writes the addresses it captured); amaxes restricted to the real rows equal the amaxes of
those rows alone; ``Fp8GraphCapture`` sets and restores the linears' capture state and puts
every history back, in place."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.transformer.fp8.linear import Fp8LinearState
from megatron_gr.transformer.fp8.recipe import Fp8Recipe
from megatron_gr.transformer.fp8.scaling import AmaxHistory, quantize_per_column_transposed, quantize_per_tensor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
KINDS = ["normal", "zeros", "normal", "inf", "huge", "nan", "tiny", "normal"]


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def _tensor(kind: str, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(24, 32, generator=generator)
    if kind == "zeros":
        x.zero_()
    elif kind == "inf":
        x[3, 4] = float("inf")
    elif kind == "nan":
        x[5, 6] = float("nan")
    elif kind == "huge":
        x *= 1e36
    elif kind == "tiny":
        x *= 1e-42
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("first", ["normal", "inf"])  # a first quantisation that is not recorded still counts
@pytest.mark.parametrize("algo, length, dtype", [("max", 3, E4M3), ("most_recent", 1, E5M2)])
def test_device_side_rule_gives_the_host_rules_bits(first, algo, length, dtype):
    """The same tensors through a history on the host's fast path (eager) and one that
    decides on the device every time (captured): bit-identical operands and state."""
    eager, captured = (AmaxHistory(length=length, compute_algo=algo, dtype=dtype, margin=1) for _ in range(2))
    captured.graph_capture = True
    generator = torch.Generator().manual_seed(7)
    for step, kind in enumerate([first] + KINDS):
        x = _tensor(kind, generator)
        results = []
        for history in (eager, captured):
            results.append(quantize_per_tensor(x, dtype=dtype, margin=1, group=None, kernel="pytorch",
                                               history=history, transposed=True, pad_to=16))
        for got, want in zip(results[1], results[0]):
            assert torch.equal(_bits(got.data), _bits(want.data)), step
            assert torch.equal(_bits(got.scale_inv), _bits(want.scale_inv)), step
        for name in ("history", "scale", "records"):
            assert torch.equal(_bits(getattr(captured, name)), _bits(getattr(eager, name))), (step, name)
        assert eager.scale_is_known and not captured.scale_is_known  # the host's shortcut, eager only
    assert captured.records.item() == len(KINDS) + 1


def test_records_update_the_state_tensors_in_place():
    """A CUDA graph replays the addresses it captured: a record that made new tensors would
    leave the replayed scales unchanged (and every eager reader behind)."""
    history = AmaxHistory(length=3, compute_algo="max", dtype=E4M3, margin=0)
    history.record(torch.tensor([2.0]))
    tensors = (history.history, history.scale, history.records)
    pointers = [t.data_ptr() for t in tensors]
    for amax in (4.0, float("nan"), 1.0):
        history.record(torch.tensor([amax]))
    assert [t.data_ptr() for t in (history.history, history.scale, history.records)] == pointers
    assert all(a is b for a, b in zip(tensors, (history.history, history.scale, history.records)))
    assert history.history.tolist() == [1.0, 4.0, 2.0] and history.records.item() == 4
    assert history.scale.item() == pytest.approx(448.0 / 4.0)


def test_amaxes_of_the_real_rows_equal_those_rows_alone():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, generator=generator)
    x[29:] *= 1e3  # padding rows that would set every scale
    rows = (torch.arange(40) < 29).view(-1, 1)
    masked, _ = quantize_per_tensor(x, dtype=E4M3, margin=0, group=None, kernel="pytorch", rows=rows)
    alone, _ = quantize_per_tensor(x[:29], dtype=E4M3, margin=0, group=None, kernel="pytorch")
    assert torch.equal(_bits(masked.scale_inv), _bits(alone.scale_inv))
    assert torch.equal(_bits(masked.data[:29]), _bits(alone.data))
    columns = quantize_per_column_transposed(x, dtype=E5M2, margin=0, group=None, kernel="pytorch", rows=rows)
    columns_alone = quantize_per_column_transposed(x[:29], dtype=E5M2, margin=0, group=None, kernel="pytorch")
    assert torch.equal(_bits(columns.scale_inv), _bits(columns_alone.scale_inv))
    assert torch.equal(_bits(columns.data[:, :29]), _bits(columns_alone.data))


class _Linear(torch.nn.Module):
    """What ``Fp8GraphCapture`` looks for: a module with a weight and an ``fp8_state``."""

    def __init__(self, recipe: Fp8Recipe):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 32))
        self.fp8_state = Fp8LinearState(recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron_gr.transformer.fp8.linear import fp8_linear

        return fp8_linear(x, self.weight, None, state=self.fp8_state)


def test_capture_scope_keeps_the_histories_and_restores_the_flags():
    from megatron_gr.transformer.fp8.graph_capture import Fp8GraphCapture

    linear = _Linear(Fp8Recipe(recipe="delayed", amax_history_len=2, amax_compute_algo="max"))
    state = linear.fp8_state
    linear(torch.randn(20, 32)).sum().backward()  # one eager micro-batch: one amax each
    before = {name: getattr(state.input_history, name).clone() for name in ("history", "scale", "records")}
    tensors = [getattr(h, name) for h in state.histories for name in ("history", "scale", "records")]
    scope = Fp8GraphCapture([torch.nn.Sequential(linear)])
    assert scope.states == [state]
    keys = torch.tensor([5, 9, -1, 3] * 5)  # negative: padding
    with scope.state_kept():
        assert state.graph_capture and state.input_history.graph_capture and state.token_rows is None
        with scope.capturing(keys):
            assert state.token_rows.tolist() == (keys >= 0).tolist()
            for _ in range(3):
                linear(torch.randn(20, 32) * 100).sum().backward()
        assert state.graph_capture and state.token_rows is None  # the outer scope's again
        assert state.input_history.records.item() == 4
    assert not state.graph_capture and not state.input_history.graph_capture
    for name, value in before.items():
        assert torch.equal(getattr(state.input_history, name), value), name
    assert all(a is b for a, b in zip(tensors, [getattr(h, n) for h in state.histories
                                                for n in ("history", "scale", "records")]))
    assert state.input_history.scale_is_known  # the host's shortcut is back
