"""The FP8 column- and row-parallel linears on 2 gloo ranks (TP=2, with and without
sequence parallelism) against one rank, every recipe: amaxes of split tensors are reduced
(max) over the tensor-parallel group, so both ranks quantise with the global amax (the
delayed histories hold it: ranks whose local amaxes differ end with the same scale) and
outputs and gradients equal the single-rank FP8 linear's to float32 rounding.

The reference (full weights, inputs, output gradients, results of two micro-batches) is
computed here and written to a file; each rank runs its shard and compares.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gr.config import GRTransformerConfig, TrainingConfig
from megatron_gr.transformer.fp8 import Fp8LinearState, Fp8Recipe, fp8_linear
from tests.support.multirank import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2
T, K, N = 38, 64, 96  # 38 tokens: the weight-gradient GEMM pads them to 48
RECIPES = ("tensorwise", "delayed", "rowwise")
RTOL = 1e-5  # float32 accumulation order (partial sums reduced over ranks)


def recipe(name: str) -> Fp8Recipe:
    return Fp8Recipe(format="hybrid", recipe=name, amax_history_len=2, amax_compute_algo="max")


def micro_batches(seed: int, inputs: int, outputs: int):
    """Two micro-batches of ``[T, 1, inputs]`` inputs and ``[T, 1, outputs]`` output
    gradients; in the second the input grows and its first quarter of features dominates
    (ranks holding different features see different local amaxes)."""
    g = torch.Generator().manual_seed(seed)
    first = (torch.randn(T, 1, inputs, generator=g), torch.randn(T, 1, outputs, generator=g) * 1e-2)
    x2 = torch.randn(T, 1, inputs, generator=g) * 3
    x2[..., : inputs // 4] *= 5
    return [first, (x2, torch.randn(T, 1, outputs, generator=g) * 1e-2)]


def reference_runs() -> dict:
    """Single-rank results: column (x [T, K] -> [T, N]) then row (x [T, N] -> [T, K])."""
    g = torch.Generator().manual_seed(0)
    weights = {
        "column": (torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g)),
        "row": (torch.randn(K, N, generator=g) * 0.1, torch.randn(K, generator=g)),
    }
    results = {}
    for name in RECIPES:
        for kind, (w, b) in weights.items():
            state = Fp8LinearState(recipe(name))
            runs = []
            inputs, outputs = w.shape[1], w.shape[0]
            for x, g_out in micro_batches(1 if kind == "column" else 2, inputs, outputs):
                x, w_, b_ = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
                y = fp8_linear(x, w_, b_, state=state)
                y.backward(g_out)
                runs.append({"x": x.detach(), "g": g_out, "y": y.detach(), "dx": x.grad, "dw": w_.grad, "db": b_.grad})
            history = state.input_history
            results[(name, kind)] = {
                "runs": runs,
                "input_scale": None if history is None else history.scale.clone(),
            }
    return {"weights": weights, "results": results}


def test_tensor_parallel_fp8_linears_match_one_rank(megatron_cpu, tmp_path):
    torch.save(reference_runs(), tmp_path / "reference.pt")
    run_ranks(WORLD, "tests.unit.parallel.test_fp8_tensor_parallel:check_shards", str(tmp_path), workdir=tmp_path)


def check_shards(directory: str) -> None:
    """One rank (started by the multi-rank harness): its shards of every recipe's linears,
    with and without sequence parallelism, against the reference; a mismatch raises."""
    from megatron_gr.training.runtime import initialize

    rank = torch.distributed.get_rank()
    reference = torch.load(Path(directory) / "reference.pt")
    initialize(TrainingConfig(device="cpu", seed=5), tensor_parallel_size=WORLD)
    for name in RECIPES:
        for sequence_parallel in (False, True):
            for kind in ("column", "row"):
                _check(reference, rank, name, kind, sequence_parallel)


def _close(actual, expected, what):
    error = (actual.double() - expected.double()).norm() / expected.double().norm()
    if not error < RTOL:
        raise AssertionError(f"{what}: relative error {error.item():.3g}")


def _check(reference, rank, name, kind, sequence_parallel):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gr.transformer.fp8.parallel_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear

    where = f"{name} {kind} sequence_parallel={sequence_parallel}"
    config = GRTransformerConfig(
        num_layers=1, hidden_size=K, num_attention_heads=2, qk_head_dim=16, v_head_dim=16,
        use_cpu_initialization=True, tensor_model_parallel_size=WORLD, sequence_parallel=sequence_parallel,
        fp8="hybrid", fp8_recipe=name, **({"fp8_amax_history_len": 2, "fp8_amax_compute_algo": "max"}
                                          if name == "delayed" else {}),
    )
    w, b = reference["weights"][kind]
    common = dict(config=config, init_method=config.init_method, bias=True, skip_bias_add=False, is_expert=False)
    if kind == "column":
        linear = Fp8ColumnParallelLinear(K, N, gather_output=False, **common)
        linear.load_state_dict({"weight": w.chunk(WORLD, 0)[rank], "bias": b.chunk(WORLD, 0)[rank]}, strict=False)
    else:
        linear = Fp8RowParallelLinear(N, K, input_is_parallel=True, **common)
        linear.load_state_dict({"weight": w.chunk(WORLD, 1)[rank], "bias": b}, strict=False)
    tokens = slice(rank * T // WORLD, (rank + 1) * T // WORLD)
    expected = reference["results"][(name, kind)]
    for step, run in enumerate(expected["runs"]):
        x, g = run["x"], run["g"]
        if kind == "row":
            x = x.chunk(WORLD, -1)[rank]  # the input features are split
        else:
            g = g.chunk(WORLD, -1)[rank]  # the output features are split
        if sequence_parallel:
            if kind == "column":
                x = x[tokens]  # gathered inside the linear
            else:
                g = g[tokens]  # the output is reduce-scattered over tokens
        x = x.clone().requires_grad_()
        y, _ = linear(x)
        y.backward(g)
        what = f"{where} micro-batch {step}"
        if kind == "column":
            _close(y, run["y"].chunk(WORLD, -1)[rank], f"{what}: output")
            _close(x.grad, run["dx"][tokens] if sequence_parallel else run["dx"], f"{what}: input gradient")
            _close(linear.weight.grad, run["dw"].chunk(WORLD, 0)[rank], f"{what}: weight gradient")
            _close(linear.bias.grad, run["db"].chunk(WORLD, 0)[rank], f"{what}: bias gradient")
        else:
            _close(y, run["y"][tokens] if sequence_parallel else run["y"], f"{what}: output")
            _close(x.grad, run["dx"].chunk(WORLD, -1)[rank], f"{what}: input gradient")
            _close(linear.weight.grad, run["dw"].chunk(WORLD, 1)[rank], f"{what}: weight gradient")
            bias_grad = linear.bias.grad.clone()
            if sequence_parallel:  # finalize_model_grads sums sequence-parallel grads over the group
                dist.all_reduce(bias_grad, group=parallel_state.get_tensor_model_parallel_group())
            _close(bias_grad, run["db"], f"{what}: bias gradient")
        linear.weight.grad = linear.bias.grad = None
    if name == "delayed" and kind == "row":
        # the split input's local amaxes differ between ranks; the history holds the max
        local = run["x"].chunk(WORLD, -1)[rank].abs().max().reshape(1)
        both = [torch.zeros(1) for _ in range(WORLD)]
        dist.all_gather(both, local)
        assert both[0].item() != both[1].item(), f"{where}: the test needs different local amaxes"
        history = linear.fp8_state.input_history
        if history.history[0].item() != max(v.item() for v in both):
            raise AssertionError(f"{where}: newest history entry {history.history[0].item()} is not the global max")
        if not torch.equal(history.scale, expected["input_scale"]):
            raise AssertionError(f"{where}: scale {history.scale.item()} != one rank's {expected['input_scale'].item()}")
