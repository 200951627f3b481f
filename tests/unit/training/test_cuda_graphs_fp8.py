"""FP8 linears under ``training.cuda_graphs``: the plan guards (CPU); on the CPU with
emulated graphs (``apply_cuda_graphs(..., emulate=True)``, the FP8 GEMMs on
``torch._scaled_mm`` with the PyTorch cast): every recipe trains as the eager run (losses,
weights and, delayed, the amax histories), the warm-ups and captures leave every history as
it was and no weight cast behind, captured linears cast their weights on every call, and a
replay updates the histories' own tensors (what a replayed CUDA graph writes); on a GPU the
graphed FP8 step against the eager one (tensorwise and delayed)."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.config import ConfigError, ExperimentConfig
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.training import plan
from megatron_gr.training.plan import ParallelLayout, _check_cuda_graphs

# FP8 GEMMs need layer sizes that are multiples of 16
MODEL = {"hidden_size": 32, "qk_head_dim": 16, "v_head_dim": 16, "hidden_dropout": 0.1, "embedding_dropout": 0.0}
TRAINING = {"train_iters": 3, "lr_decay_iters": 3, "lr_warmup_iters": 1}  # 2 micro-batches a step
RECIPES = {  # recipe-format: model fields
    "tensorwise-hybrid": {"fp8": "hybrid", "fp8_recipe": "tensorwise"},
    "delayed-e4m3": {"fp8": "e4m3", "fp8_recipe": "delayed", "fp8_amax_history_len": 4, "fp8_amax_compute_algo": "max"},
    "delayed-hybrid-mhc": {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 2,
                           "fp8_amax_compute_algo": "most_recent", "enable_hyper_connections": True},
    "rowwise-e4m3": {"fp8": "e4m3", "fp8_recipe": "rowwise"},
}
ONE_STAGE = ParallelLayout(world_size=1, tensor=1, pipeline=1, data=1, sequence_parallel=False)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """The plan refuses FP8 on a CPU; these tests lift that one check."""
    monkeypatch.setattr(plan, "check_fp8_runnable", lambda config, device: None)


# ------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("mode", ["layers", "step"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_native_fp8_linears_pass_the_graph_guards(monkeypatch, mode, recipe):
    monkeypatch.setattr(plan, "transformer_engine_available", lambda: False)
    config = ExperimentConfig.from_dict({"training": {"cuda_graphs": mode},
                                         "model": {"fp8": "hybrid", "fp8_recipe": recipe}})
    _check_cuda_graphs(config, torch.device("cuda", 0), KernelBackend.TRITON, ONE_STAGE)


def test_transformer_engine_fp8_under_graphs_is_one_line(monkeypatch):
    monkeypatch.setattr(plan, "transformer_engine_available", lambda: True)
    config = ExperimentConfig.from_dict({"training": {"cuda_graphs": "layers"}, "model": {"fp8": "e4m3"}})
    with pytest.raises(ConfigError) as error:
        _check_cuda_graphs(config, torch.device("cuda", 0), KernelBackend.TRITON, ONE_STAGE)
    assert "Transformer Engine's FP8 linears (model.fp8='e4m3'" in str(error.value)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ emulated on the CPU
def _trainer(tmp_path, fields: dict):
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    return Trainer(tiny_config(tmp_path, model={**MODEL, **fields}, training=TRAINING))


def _graph(trainer, mode: str):
    from megatron_gr.training.cuda_graphs import apply_cuda_graphs
    from megatron_gr.training.model_setup import unwrap

    return apply_cuda_graphs(unwrap(trainer.model[0]), mode=mode, max_tokens=512, num_slots=1,
                             micro_batch_size=trainer.config.training.micro_batch_size, sequence_parallel_size=1,
                             emulate=True)


def _fp8_states(trainer) -> dict:
    return {name: module.fp8_state for name, module in trainer.model[0].named_modules() if hasattr(module, "fp8_state")}


def _histories(trainer) -> dict[str, torch.Tensor]:
    """Every amax history and scale, and how many amaxes each recorded, by linear."""
    out = {}
    for name, state in _fp8_states(trainer).items():
        for which in ("input_history", "grad_history"):
            history = getattr(state, which)
            if history is not None:
                out[f"{name}.{which}"] = history.history.clone()
                out[f"{name}.{which}.scale"] = history.scale.clone()
                out[f"{name}.{which}.records"] = history.records.clone()
    return out


def _run(trainer, steps: int = 3) -> dict:
    from megatron_gr.training.model_setup import unwrap

    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    weights = {k: v.detach().clone() for k, v in unwrap(trainer.model[0]).state_dict().items() if torch.is_tensor(v)}
    return {"losses": losses, "weights": weights, "histories": _histories(trainer)}


_EAGER: dict = {}


def _eager(tmp_path_factory, key) -> dict:
    """The eager run of a recipe (once per module: both modes compare with it)."""
    if key not in _EAGER:
        _EAGER[key] = _run(_trainer(tmp_path_factory.mktemp("eager"), RECIPES[key]))
    return _EAGER[key]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("mode", ["layers", "step"])
@pytest.mark.parametrize("key", list(RECIPES))
def test_fp8_graphed_steps_train_as_eager_steps(megatron_cpu, tmp_path_factory, fp8_on_cpu, key, mode):
    """3 steps of 2 micro-batches through the emulated graphs give the eager losses, weights
    and (delayed) amax histories (one case with hyper-connections). The first step decides on the device that each delayed
    tensor is scaled by its own amax, as the eager step does on the host; with the warm-ups'
    amaxes left in the histories (random inputs) the first step would scale otherwise."""
    eager = _eager(tmp_path_factory, key)
    trainer = _trainer(tmp_path_factory.mktemp(mode), RECIPES[key])
    runner = _graph(trainer, mode)
    graphed = _run(trainer)
    assert runner.replays == 3 * 2 * len(runner.units) and runner.eager_calls == 0
    # the padded batches' GEMMs sum in another order (fp32 rounding, which may move an FP8
    # rounding of a few elements): equal to far below FP8 precision (2^-4 .. 2^-3)
    assert graphed["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    for name, weight in eager["weights"].items():
        assert _relative(graphed["weights"][name], weight) < 1e-5, name
    assert graphed["histories"].keys() == eager["histories"].keys()
    assert bool(eager["histories"]) == key.startswith("delayed")
    for name, value in eager["histories"].items():
        if name.endswith(".records"):
            assert torch.equal(graphed["histories"][name], value), name  # 6 forward and 6 backward amaxes
        else:
            assert _relative(graphed["histories"][name], value) < 1e-5, name


def test_captures_leave_the_histories_and_no_weight_cast(megatron_cpu, tmp_path, fp8_on_cpu):
    """The warm-ups and captures run the delayed linears on random inputs: afterwards every
    history, scale and record count is what it was (the first step's, here), in the same
    tensors. A capture made as a step begins (megatron's schedule has just set
    ``is_first_microbatch``) keeps no weight cast: a cast made during a capture lives in the
    graph's memory pool and would be handed to later eager calls. Then every captured call
    casts its weight (a replayed graph runs the cast it captured), and so does the eager
    fallback after it."""
    from megatron_gr.transformer.fp8.linear import Fp8LinearState

    trainer = _trainer(tmp_path, RECIPES["delayed-e4m3"])
    modules = [m for m in trainer.model[0].modules() if hasattr(m, "fp8_state")]
    for module in modules:
        module.is_first_microbatch = True  # as megatron's schedule sets it at a step's first micro-batch
        for history in module.fp8_state.histories:
            history.allocate(module.weight.device)
    before = _histories(trainer)
    tensors = {name: t.data_ptr() for name, t in _tensors(trainer).items()}
    runner = _graph(trainer, "layers")
    assert all(torch.equal(value, before[name]) for name, value in _histories(trainer).items())
    assert {name: t.data_ptr() for name, t in _tensors(trainer).items()} == tensors
    assert all(m._weight_cast is None and m.is_first_microbatch is True for m in modules)
    assert not any(state.graph_capture for state in _fp8_states(trainer).values())

    casts = []
    original = Fp8LinearState.cast_weight
    try:
        Fp8LinearState.cast_weight = lambda self, weight: casts.append(self) or original(self, weight)
        trainer.train_step()  # 2 micro-batches, both replayed: 2 casts per linear (eager: 1 per step)
        assert runner.replays == 2 * len(runner.units) and len(casts) == 2 * len(modules)
    finally:
        Fp8LinearState.cast_weight = original
    assert {name: t.data_ptr() for name, t in _tensors(trainer).items()} == tensors  # written in place
    assert all(value.item() == 2 for name, value in _histories(trainer).items() if name.endswith(".records"))


def _tensors(trainer) -> dict[str, torch.Tensor]:
    """The histories' state tensors themselves (not copies)."""
    return {f"{name}.{which}.{field}": getattr(getattr(state, which), field)
            for name, state in _fp8_states(trainer).items() for which in ("input_history", "grad_history")
            for field in ("history", "scale", "records")}


# ---------------------------------------------------------------------------------- GPU
def _gpu_trainer(tmp_path, mode: str, fields: dict):
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    model = {"hidden_dropout": 0.0, "embedding_dropout": 0.0, "hidden_size": 64, "qk_head_dim": 32,
             "v_head_dim": 32, **fields}
    config = tiny_config(tmp_path, model=model, embeddings={"item": {"dim": 64}},
                         training={"device": "cuda", "kernel_backend": "triton", "cuda_graphs": mode, "seed": 5,
                                   "precision": "bf16"})
    return Trainer(config)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["layers", "step"])
@pytest.mark.parametrize("key", ["tensorwise-hybrid", "delayed-e4m3"])
def test_gpu_fp8_graphed_steps_train_as_eager_steps(tmp_path, key, mode):
    """Captured CUDA graphs of FP8 layers (Triton casts, ``torch._scaled_mm``) train as the
    eager FP8 step: losses to bf16 tolerance (the padded batches' GEMMs have other shapes),
    every micro-batch replayed; delayed: the histories recorded as many amaxes as eagerly,
    and the amaxes and scales agree to bf16 tolerance."""
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    eager_trainer = _gpu_trainer(tmp_path / "eager", "none", RECIPES[key])
    eager = _run(eager_trainer, steps=4)
    trainer = _gpu_trainer(tmp_path / "graphs", mode, RECIPES[key])
    runner = graph_runner(unwrap(trainer.model[0]))
    assert runner is not None and runner.capture_memory_bytes > 0
    graphed = _run(trainer, steps=4)
    assert runner.replays > 0 and runner.eager_calls == 0 and not runner.busy
    assert graphed["losses"] == pytest.approx(eager["losses"], rel=1e-2)
    assert graphed["histories"].keys() == eager["histories"].keys()
    for name, value in eager["histories"].items():
        if name.endswith(".records"):
            assert torch.equal(graphed["histories"][name], value), name
        else:
            assert _relative(graphed["histories"][name], value) < 5e-2, name
