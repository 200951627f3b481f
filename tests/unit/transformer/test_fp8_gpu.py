"""The FP8 linears on a GPU (skipped without one), every recipe and format, bf16
activations and weights, the fused Triton cast:

- against the simulated reference of ``test_fp8_linear`` (the same quantisation done on
  the CPU in float64): equal up to the bf16 rounding of the results (relative 1e-2);
- against the exact float64 product and the bf16 linear, within the FP8 precision bound
  of the operands: the forward multiplies two e4m3 operands (3 mantissa bits, unit
  roundoff u = 2^-4), so its relative error (Frobenius) stays below u; the gradient GEMMs
  multiply an e5m2 gradient (u = 2^-3 under ``hybrid``, 2^-4 under ``e4m3``) with an e4m3
  operand, below the gradient format's u (random data measures about a third of each:
  2.2% forward, 5.5% gradients on the CPU);
- the Triton cast against the PyTorch one inside the linear: bit-identical results;
- and the plan-time check accepts every recipe on this GPU (its ``torch._scaled_mm``
  probe runs each GEMM kind).
"""

from __future__ import annotations

import pytest
import torch

from megatron_gr.transformer.fp8 import Fp8LinearState, Fp8Recipe, fp8_linear
from tests.unit.transformer.test_fp8_linear import reference, relative

pytestmark = pytest.mark.gpu

RECIPES = pytest.mark.parametrize("recipe_name", ["tensorwise", "delayed", "rowwise"])
FORMATS = pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
SHAPES = [(8195, 1024, 4096), (4096, 4096, 1024)]  # tokens (not a multiple of 16), in, out


def problem(tokens, k, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, k, device="cuda", generator=g)
    x *= torch.exp2(torch.randint(-3, 3, (tokens, 1), device="cuda", generator=g).float())
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    b = torch.randn(n, device="cuda", generator=g)
    grad = torch.randn(tokens, n, device="cuda", generator=g) * 1e-3
    return x.bfloat16(), w.bfloat16(), b.bfloat16(), grad.bfloat16()


def run(state, x, w, b, grad):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = fp8_linear(x, w, b, state=state)
    y.backward(grad)
    return y.detach(), x.grad, w.grad, b.grad


@RECIPES
@FORMATS
def test_fp8_linear_on_gpu_matches_the_simulated_reference(recipe_name, fmt):
    recipe = Fp8Recipe(format=fmt, recipe=recipe_name)
    x, w, b, grad = problem(1031, 256, 512)
    got = run(Fp8LinearState(recipe), x, w, b, grad)
    simulated = reference(recipe, *(t.float().cpu() for t in (x, w, b, grad)))
    for name, value, expected in zip(("y", "dx", "dw", "db"), got, simulated):
        assert relative(value.cpu(), expected) < 1e-2, name


@RECIPES
@FORMATS
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp8_linear_on_gpu_within_fp8_precision(recipe_name, fmt, shape):
    x, w, b, grad = problem(*shape)
    got = run(Fp8LinearState(Fp8Recipe(format=fmt, recipe=recipe_name)), x, w, b, grad)
    exact = (x.double() @ w.double().t() + b.double(), grad.double() @ w.double(), grad.double().t() @ x.double())
    plain = run_bf16(x, w, b, grad)
    u_forward, u_backward = 2.0**-4, 2.0 ** (-3 if fmt == "hybrid" else -4)
    for name, value, expected, bound, bf16 in zip(("y", "dx", "dw"), got, exact, (u_forward, u_backward, u_backward), plain):
        error = relative(value, expected)
        assert error < bound, (name, error, "bf16 linear:", relative(bf16, expected))


def run_bf16(x, w, b, grad):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = torch.nn.functional.linear(x, w, b)
    y.backward(grad)
    return y.detach(), x.grad, w.grad


@RECIPES
def test_triton_and_pytorch_casts_give_identical_linears(recipe_name):
    x, w, b, grad = problem(4099, 1024, 2048, seed=1)
    results = []
    for kernel in ("pytorch", "triton"):
        state = Fp8LinearState(Fp8Recipe(recipe=recipe_name), kernel=kernel)
        results.append([run(state, x * scale, w, b, grad) for scale in (1.0, 3.0)])  # delayed: the history too
    for first, second in zip(*results):
        for a, c in zip(first, second):
            assert torch.equal(a, c)


@RECIPES
@FORMATS
def test_plan_time_check_accepts_every_recipe_on_this_gpu(recipe_name, fmt):
    from megatron_gr.config import GRTransformerConfig
    from megatron_gr.transformer.fp8 import check_fp8_runnable

    extra = {"fp8_amax_history_len": 16, "fp8_amax_compute_algo": "max"} if recipe_name == "delayed" else {}
    config = GRTransformerConfig(num_layers=1, hidden_size=1024, num_attention_heads=4, qk_head_dim=256,
                                 v_head_dim=256, bf16=True, fp8=fmt, fp8_recipe=recipe_name, **extra)
    check_fp8_runnable(config, torch.device("cuda", torch.cuda.current_device()))


@RECIPES
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_overflow_shows_as_nan_on_gpu(recipe_name, poison):
    x, w, b, grad = problem(1031, 256, 512, seed=2)
    state = Fp8LinearState(Fp8Recipe(recipe=recipe_name))
    run(state, x, w, b, grad)  # a clean first call (delayed: fills the history)
    x[5, 7] = poison
    y, *_ = run(state, x, w, b, grad)
    poisoned = y[5] if recipe_name == "rowwise" else y
    assert torch.isnan(poisoned).all()
    if recipe_name == "rowwise":
        assert torch.isfinite(torch.cat([y[:5], y[6:]])).all()
