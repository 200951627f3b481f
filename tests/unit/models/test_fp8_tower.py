"""The ranking tower's FP8 linear on the CPU (``torch._scaled_mm`` runs there): a fusion
layer of any size (zero-padded to 16 for the GEMM) against the simulated reference of the
transformer's FP8 linear tests, its per-step weight cast, its state dict; and the tower
built with FP8 fusion layers and bf16 task heads."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.config.ranking_config import TaskConfig, TowerConfig
from megatron_gr.models.ranking.fusion_linear import fusion_linear
from megatron_gr.models.ranking.tower import MultiTaskTower
from megatron_gr.transformer.fp8 import Fp8Recipe
from megatron_gr.transformer.fp8.replicated_linear import Fp8Linear
from tests.unit.transformer.test_fp8_linear import TOLERANCE, fp8_config, random_problem, reference, relative


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def run(linear, x, g):
    x = x.clone().requires_grad_()
    y = linear(x)
    y.backward(g)
    return y.detach(), x.grad, linear.weight.grad, linear.bias.grad


@pytest.mark.parametrize("recipe_name", ["tensorwise", "delayed", "rowwise"])
@pytest.mark.parametrize("k, n", [(64, 48), (36, 24)], ids=["aligned", "padded"])
def test_fp8_linear_matches_simulated_reference(megatron_cpu, recipe_name, k, n):
    config = fp8_config(fp8_recipe=recipe_name)
    linear = Fp8Linear(k, n, config=config)
    x, w, b, g = random_problem(seed=11, tokens=29, k=k, n=n)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    results = run(linear, x, g)
    assert results[0].shape == (29, n) and results[2].shape == (n, k)  # the module's own shapes
    expected = reference(Fp8Recipe.from_config(config), x, w, b, g)
    for name, got, want in zip(("y", "dx", "dw", "db"), results, expected):
        assert relative(got, want) < TOLERANCE, name


def test_fp8_linear_casts_its_weight_once_per_step_and_keeps_the_linear_state_dict(megatron_cpu):
    linear = Fp8Linear(36, 24, config=fp8_config(fp8_recipe="delayed", fp8_amax_history_len=4))
    assert linear.state_dict().keys() == torch.nn.Linear(36, 24).state_dict().keys()
    casts = []
    original = linear.fp8_state.cast_weight
    linear.fp8_state.cast_weight = lambda weight: casts.append(weight) or original(weight)
    x = torch.randn(10, 36)
    for step in range(2):
        linear.is_first_microbatch = True  # megatron's schedule, at a step's first micro-batch
        for _ in range(3):
            linear(x).sum().backward()
        assert len(casts) == step + 1
        with torch.no_grad():
            linear.weight.mul_(0.5)  # the optimizer step
    history = linear.fp8_state.input_history
    assert history.records.item() == 6 and torch.all(history.history[:4] > 0)  # one amax per micro-batch


def test_tower_runs_fusion_layers_in_fp8_and_heads_in_the_model_precision(megatron_cpu):
    tower_config = TowerConfig(hidden_sizes=[32, 20], layer_norm=True)
    tasks = [TaskConfig(name="click", type="binary", label="a", bitmask=1), TaskConfig(name="time", type="regression", label="b")]
    config = fp8_config(fp8_recipe="tensorwise")
    torch.manual_seed(5)
    fp8 = MultiTaskTower(tower_config, tasks, 36, 1e-5, linear=fusion_linear(config))
    torch.manual_seed(5)
    plain = MultiTaskTower(tower_config, tasks, 36, 1e-5)
    fusion = [type(m) for m in fp8.fusion if isinstance(m, torch.nn.Linear)]
    assert fusion == [Fp8Linear, Fp8Linear]
    assert all(type(head) is torch.nn.Linear for head in fp8.heads.values())
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    for (name, a), (_, b) in zip(fp8.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name  # the same initial values
    assert fusion_linear(fp8_config(fp8=None, fp8_recipe="delayed")) is torch.nn.Linear
    x = torch.randn(40, 36)
    got, want = fp8(x), plain(x)
    assert not torch.equal(got, want)  # FP8 rounding is in the path
    assert relative(got, want) < 2**-4  # and the outputs agree to FP8 precision
