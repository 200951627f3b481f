"""The FP8 linear end to end on the CPU (``torch._scaled_mm`` runs there in torch 2.13):
forward output and input, weight and bias gradients against a simulated reference in
float64 (operands quantised with ``tensor.to(torch.float8_*)``, dequantised, multiplied),
for every recipe and format; the parallel linears' per-step weight cast; STU and
transformer layers built by the specs with FP8 linears."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_gr.config import GRTransformerConfig
from megatron_gr.transformer.fp8 import Fp8LinearState, Fp8Recipe, fp8_linear
from megatron_gr.transformer.fp8.parallel_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from megatron_gr.transformer.specs import get_stu_layer_spec, get_transformer_block_spec

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# _scaled_mm accumulates in float32 against the float64 reference
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Leaves torch's global generator as it found it: later tests in the process draw
    their weights from it."""
    with torch.random.fork_rng():
        yield


def dequantised(x: torch.Tensor, dtype, *, along=None) -> torch.Tensor:
    """``x`` quantised with the scale of its amax (per tensor, or along dim ``along``:
    one scale per slice across it), as float64 values."""
    if along is None:
        amax = x.abs().max()
    else:
        amax = x.abs().amax(dim=along, keepdim=True)
    scale = (FP8_MAX[dtype] / amax.float().clamp(min=1e-12)).float()
    data = (x.float() * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return data.double() * scale.reciprocal().double()


def reference(recipe: Fp8Recipe, x, w, b, g):
    """(y, dx, dw, db) in float64 of the recipe's quantised GEMMs."""
    fwd, bwd = recipe.forward_dtype, recipe.backward_dtype
    if recipe.rowwise:
        y = dequantised(x, fwd, along=1) @ dequantised(w, fwd, along=1).t()
        dx = dequantised(g, bwd, along=1) @ dequantised(w, fwd, along=0)
        dw = dequantised(g, bwd, along=0).t() @ dequantised(x, fwd, along=0)
    else:
        qx, qg = dequantised(x, fwd), dequantised(g, bwd)
        y = qx @ dequantised(w, fwd).t()
        dx = qg @ dequantised(w, fwd)
        dw = qg.t() @ qx
    if not recipe.wgrad:
        dw = g.double().t() @ x.double()
    return y + b.double(), dx, dw, g.double().sum(0)


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_linear(state, x, w, b, g):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = fp8_linear(x, w, b, state=state)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


def random_problem(seed, tokens=37, k=64, n=48):
    gen = torch.Generator().manual_seed(seed)
    # uneven magnitudes per token and per feature: row-wise scales matter
    x = torch.randn(tokens, k, generator=gen) * torch.exp2(torch.randint(-4, 4, (tokens, 1), generator=gen).float())
    w = torch.randn(n, k, generator=gen) * 0.1 * torch.exp2(torch.randint(-3, 3, (n, 1), generator=gen).float())
    b = torch.randn(n, generator=gen)
    g = torch.randn(tokens, n, generator=gen) * 1e-3
    return x, w, b, g


@pytest.mark.parametrize("recipe_name", ["tensorwise", "delayed", "rowwise"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("wgrad", [True, False], ids=["fp8-wgrad", "hp-wgrad"])
def test_linear_matches_simulated_reference(recipe_name, fmt, wgrad):
    recipe = Fp8Recipe(format=fmt, recipe=recipe_name, wgrad=wgrad)
    state = Fp8LinearState(recipe)
    x, w, b, g = random_problem(seed=3)
    results = run_linear(state, x, w, b, g)
    for name, got, expected in zip(("y", "dx", "dw", "db"), results, reference(recipe, x, w, b, g)):
        assert relative(got, expected) < TOLERANCE, name
    # and the FP8 result is the float result to FP8 precision (e4m3 2^-4, e5m2 2^-3 per operand)
    exact = (x.double() @ w.double().t() + b.double(), g.double() @ w.double(), g.double().t() @ x.double())
    for name, got, bound in zip(("y", "dx", "dw"), results, (2**-4, 2**-3, 2**-3)):
        assert relative(got, exact[("y", "dx", "dw").index(name)]) < bound, name


def test_delayed_linear_scales_later_calls_from_the_history():
    recipe = Fp8Recipe(format="hybrid", recipe="delayed", amax_history_len=1)
    state = Fp8LinearState(recipe)
    first, second = random_problem(seed=4), random_problem(seed=5)
    run_linear(state, *first)
    y, dx, dw, _ = run_linear(state, *second)
    x, w, b, g = second
    x_prev, g_prev = first[0], first[3]

    def with_scale_of(t, previous, dtype):
        scale = torch.tensor(FP8_MAX[dtype] / previous.abs().max().item(), dtype=torch.float32)
        data = (t * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
        return data.double() * scale.reciprocal().double()

    qx, qg, qw = with_scale_of(x, x_prev, E4M3), with_scale_of(g, g_prev, E5M2), dequantised(w, E4M3)
    assert relative(y, qx @ qw.t() + b.double()) < TOLERANCE
    assert relative(dx, qg @ qw) < TOLERANCE
    assert relative(dw, qg.t() @ qx) < TOLERANCE


def test_overflowing_input_gives_nan_output_not_a_plausible_number():
    state = Fp8LinearState(Fp8Recipe(recipe="delayed"))
    x, w, b, g = random_problem(seed=6)
    run_linear(state, x, w, b, g)
    x[2, 3] = float("inf")
    y, *_ = run_linear(state, x, w, b, g)
    assert torch.isnan(y).all()
    rowwise = Fp8LinearState(Fp8Recipe(recipe="rowwise"))
    y, *_ = run_linear(rowwise, x, w, b, g)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[torch.arange(len(y)) != 2]).all()


def test_empty_input():
    for name in ("tensorwise", "rowwise"):
        state = Fp8LinearState(Fp8Recipe(recipe=name))
        x, w, b, g = random_problem(seed=7, tokens=0)
        y, dx, dw, db = run_linear(state, x, w, b, g)
        assert y.shape == (0, 48) and dx.shape == (0, 64)
        assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def fp8_config(**overrides) -> GRTransformerConfig:
    values = dict(
        num_layers=2, hidden_size=32, num_attention_heads=2, qk_head_dim=16, v_head_dim=16, ffn_hidden_size=64,
        max_seq_len=16, hidden_dropout=0.0, use_cpu_initialization=True, fp8="hybrid", fp8_recipe="tensorwise",
        init_method_std=0.1,
    )
    values.update(overrides)
    return GRTransformerConfig(**values)


def test_parallel_linear_casts_the_weight_once_per_step(megatron_cpu):
    config = fp8_config()
    linear = Fp8ColumnParallelLinear(32, 48, config=config, init_method=config.init_method, bias=True,
                                     gather_output=False, skip_bias_add=False, is_expert=False)
    x = torch.randn(20, 1, 32)
    casts = []
    original = linear.fp8_state.cast_weight
    linear.fp8_state.cast_weight = lambda weight: casts.append(weight) or original(weight)

    def micro_batch():
        out, _ = linear(x)
        out.sum().backward()
        return out.detach()

    micro_batch()
    micro_batch()
    assert len(casts) == 2  # outside megatron's schedule: every forward casts
    for step in range(2):
        linear.is_first_microbatch = True  # what megatron's schedule sets at a step's first micro-batch
        first = micro_batch()
        again = micro_batch()
        assert len(casts) == 3 + step and torch.equal(first, again)
        with torch.no_grad():
            linear.weight.mul_(2.0)  # the optimizer step
    with torch.no_grad():
        after = linear(x)[0]  # evaluation casts the updated weight
    assert len(casts) == 5
    expected = x.view(20, 32).double() @ linear.weight.detach().double().t() + linear.bias.detach().double()
    assert relative(after.view(20, 48), expected) < 2**-4
    linear.train()  # a mode change drops the cache
    assert linear._weight_cast is None and linear.is_first_microbatch is None


def test_layers_from_the_specs_use_fp8_linears(megatron_cpu):
    config = fp8_config()
    stu = build_module(get_stu_layer_spec(relative_attention_bias=False, fp8_backend="native"), config=config)
    assert isinstance(stu.uvqk_proj, Fp8ColumnParallelLinear) and isinstance(stu.output_proj, Fp8RowParallelLinear)
    block_spec = get_transformer_block_spec(config)
    block = block_spec.module(config, block_spec)
    layer = block.layers[0]
    linears = (layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2)
    assert [type(m) for m in linears] == [Fp8ColumnParallelLinear, Fp8RowParallelLinear] * 2


@pytest.mark.parametrize("hyper_connections", [False, True], ids=["plain", "mhc"])
@pytest.mark.parametrize("layer", ["stu", "transformer"])
def test_fp8_block_tracks_the_float_block(megatron_cpu, layer, hyper_connections):
    """The same weights with and without FP8 linears (hybrid, delayed): outputs and
    gradients agree to FP8 precision (a wrong operand or a lost scale is off by O(1); the
    exact numerics are the linear's tests above)."""
    from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
    from megatron_gr.transformer.specs import get_stu_block_spec

    blocks = {}
    for fp8 in (None, "hybrid"):
        config = fp8_config(fp8=fp8, fp8_recipe="delayed", enable_hyper_connections=hyper_connections,
                            relative_attention_bias=False)
        spec = get_stu_block_spec(config) if layer == "stu" else get_transformer_block_spec(config)
        torch.manual_seed(0)
        blocks[fp8] = spec.module(config, spec, post_process=False)
    blocks["hybrid"].load_state_dict(blocks[None].state_dict())
    lengths = torch.tensor([5, 9, 3, 7])
    params = JaggedSeqParams.from_offsets(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), 9,
                                          timestamps=torch.arange(24))
    x = torch.randn(24, 1, 32)  # with mHC the first stage expands it into 4 streams
    results = {}
    for fp8, block in blocks.items():
        inp = x.clone().requires_grad_()
        kwargs = {"packed_seq_params": params} if layer == "stu" else {}
        out = block(inp, attention_mask=None, **kwargs)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results[fp8] = (out.detach(), inp.grad, {n: p.grad for n, p in block.named_parameters()})
    (out, dx, grads), (out8, dx8, grads8) = results[None], results["hybrid"]
    assert relative(out8, out) < 0.05 and relative(dx8, dx) < 0.1
    # all parameter gradients together: at hidden 32, e5m2 gradients (2 mantissa bits)
    # through two layers leave 10-15% on the first layer's (up to ~30% on a single small
    # tensor such as a norm bias)
    names = [n for n, g in grads.items() if g is not None]
    assert relative(torch.cat([grads8[n].view(-1) for n in names]), torch.cat([grads[n].view(-1) for n in names])) < 0.25
