"""training.cuda_graphs: the config and plan guards (one line each, CPU); the runner's
bookkeeping with emulated graphs on the CPU (training as the eager step with keyed dropout,
each step's dropout words written into the captured tensors, the parameters' gradients from
the replayed backward equal to the eager ones); and on a GPU the same gradients (the backward
captures must not reach the parameters' own gradient nodes), the graphed step training as the
eager step (bf16 tolerance), replays at two dropout seeds equal to the eager layers at those
seeds (fp32), and the runner's bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_gr.config import ConfigError, ExperimentConfig
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.training.plan import ParallelLayout, _check_cuda_graphs, make_plan


def _config(**sections) -> ExperimentConfig:
    return ExperimentConfig.from_dict(sections)


def test_mode_and_token_limit_are_checked_by_the_config():
    with pytest.raises(ConfigError, match=r"training.cuda_graphs='all' is not allowed.*'none', 'layers', 'step'"):
        _config(training={"cuda_graphs": "all"})
    with pytest.raises(ConfigError, match=r"cuda_graph_max_tokens=64"):
        _config(training={"cuda_graph_max_tokens": 64})


def test_graphs_on_a_cpu_are_one_line_at_plan_time():
    with pytest.raises(ConfigError, match=r"^training.cuda_graphs='layers' needs a CUDA GPU .*use training.cuda_graphs=none$"):
        make_plan(_config(training={"device": "cpu", "cuda_graphs": "layers"}), world_size=1)


LAYOUT = ParallelLayout(world_size=2, tensor=1, pipeline=2, data=1, sequence_parallel=False)


@pytest.mark.parametrize("sections, words", [
    ({"training": {"cuda_graphs": "layers"}}, "needs the Triton kernels"),
    ({"training": {"cuda_graphs": "layers"}, "model": {"enable_hyper_connections": True,
                                                       "recompute_granularity": "selective",
                                                       "recompute_modules": ["mhc"]}}, "mHC recompute"),
    ({"training": {"cuda_graphs": "step"}}, "use training.cuda_graphs=layers"),
])
def test_unsupported_combinations_are_one_line(sections, words):
    backend = KernelBackend.PYTORCH if words.startswith("needs the Triton") else KernelBackend.TRITON
    with pytest.raises(ConfigError) as error:
        _check_cuda_graphs(_config(**sections), torch.device("cuda", 0), backend, LAYOUT)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("model, context, words", [
    ({}, 2, "context_parallel_size=2"),
    ({"block_type": "transformer"}, 1, "STU layers only (model.block_type='transformer')"),
])
def test_layers_graphs_cannot_capture_are_one_line(model, context, words):
    layout = ParallelLayout(world_size=context, tensor=1, pipeline=1, data=1, sequence_parallel=False, context=context)
    with pytest.raises(ConfigError) as error:
        _check_cuda_graphs(_config(training={"cuda_graphs": "layers"}, model=model), torch.device("cuda", 0),
                           KernelBackend.TRITON, layout)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_ranking_graphs_are_one_line():
    from pathlib import Path

    from megatron_gr.config.loader import load_yaml

    raw = load_yaml(Path(__file__).parents[3] / "configs" / "dlrm_hstu_synthetic.yaml")
    raw.setdefault("training", {})["cuda_graphs"] = "layers"
    config = ExperimentConfig.from_dict(raw)
    one_stage = ParallelLayout(world_size=1, tensor=1, pipeline=1, data=1, sequence_parallel=False)
    with pytest.raises(ConfigError) as error:
        _check_cuda_graphs(config, torch.device("cuda", 0), KernelBackend.TRITON, one_stage)
    assert "retrieval model's layers only (model.type='ranking'" in str(error.value)
    assert "\n" not in str(error.value)


def test_supported_combinations_pass():
    layers = _config(training={"cuda_graphs": "layers"}, model={"enable_hyper_connections": True})
    _check_cuda_graphs(layers, torch.device("cuda", 0), KernelBackend.TRITON, LAYOUT)  # PP, mHC: fine
    step = _config(training={"cuda_graphs": "step"})
    one_stage = ParallelLayout(world_size=1, tensor=1, pipeline=1, data=1, sequence_parallel=False)
    _check_cuda_graphs(step, torch.device("cuda", 0), KernelBackend.TRITON, one_stage)


# ------------------------------------------------- the runner's bookkeeping, emulated on the CPU
def _cpu_trainer(tmp_path, mode: str, *, hyper_connections: bool = False, dropout: float = 0.2):
    """A tiny CPU trainer; with ``mode`` its layers replayed through the graph runner with
    emulated graphs (the same static buffers, copies, padding, slots and autograd plumbing;
    the work re-run instead of a CUDA graph replayed: a value the runner forgot to write
    into the static tensors is read stale, as a replayed graph would)."""
    from megatron_gr.training.cuda_graphs import apply_cuda_graphs
    from megatron_gr.training.model_setup import unwrap
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    model = {"hidden_dropout": dropout, "embedding_dropout": 0.0, "enable_hyper_connections": hyper_connections}
    trainer = Trainer(tiny_config(tmp_path, model=model))
    runner = None
    if mode != "none":
        runner = apply_cuda_graphs(unwrap(trainer.model[0]), mode=mode, max_tokens=512,
                                   micro_batch_size=trainer.config.training.micro_batch_size, num_slots=1,
                                   sequence_parallel_size=1, emulate=True)
    return trainer, runner


def _cpu_losses(tmp_path, mode: str, *, hyper_connections: bool, steps: int = 3):
    """Losses and final weights of a tiny CPU run with dropout (keyed: each step its masks)."""
    from megatron_gr.training.model_setup import unwrap

    trainer, runner = _cpu_trainer(tmp_path, mode, hyper_connections=hyper_connections)
    bare = unwrap(trainer.model[0])
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    weights = {k: v.detach().clone() for k, v in bare.state_dict().items() if torch.is_tensor(v)}
    return losses, weights, runner


@pytest.mark.parametrize("mode", ["layers", "step"])
@pytest.mark.parametrize("hyper_connections", [False, True], ids=["plain", "mhc"])
def test_replayed_units_train_as_eager_layers(megatron_cpu, tmp_path, mode, hyper_connections):
    eager_losses, eager_weights, _ = _cpu_losses(tmp_path / "eager", "none", hyper_connections=hyper_connections)
    losses, weights, runner = _cpu_losses(tmp_path / mode, mode, hyper_connections=hyper_connections)
    assert runner.replays == 3 * 2 * len(runner.units)  # 3 steps x 2 micro-batches, every unit replayed
    assert runner.eager_calls == 0 and not runner.busy
    assert len(runner.captured) == len(runner.buckets.sizes)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["layers", "step"])
def test_graphs_of_a_block_that_fuses_its_merges(megatron_cpu, tmp_path, mode):
    """A block that fuses its hyper-connection ops across layers (the Triton backend's
    default; forced here on the CPU's references, the same numbers): graphed layers take
    and return tensors, so ``layers`` turns the cross-layer fusion off and every layer call
    replays (no silent eager fallback); ``step`` captures the fused stack whole. Both train
    as the eager fused block."""
    from megatron_gr.training.cuda_graphs import apply_cuda_graphs
    from megatron_gr.training.model_setup import unwrap

    results = {}
    for name in ("none", mode):
        trainer, _ = _cpu_trainer(tmp_path / name, "none", hyper_connections=True)
        model = unwrap(trainer.model[0])
        model.decoder.fuse_merges = True
        runner = None
        if name != "none":
            runner = apply_cuda_graphs(model, mode=mode, max_tokens=512, num_slots=1, sequence_parallel_size=1,
                                       micro_batch_size=trainer.config.training.micro_batch_size, emulate=True)
        results[name] = [trainer.train_step()["loss"] for _ in range(2)]
    assert model.decoder.fuse_merges == (mode == "step")
    assert runner.replays == 2 * 2 * len(runner.units) and runner.eager_calls == 0
    assert results[mode] == pytest.approx(results["none"], rel=1e-6)


def _stack_output_at_seed(model, batch, seed: int) -> torch.Tensor:
    """What the layer stack adds to its input (its output minus its input: the part dropout
    acts on) for the real tokens of ``batch`` (forward and backward) at dropout seed ``seed``."""
    changes = []

    def record(module, args, kwargs, output):
        changes.append((output - kwargs["hidden_states"]).detach())

    hook = model.decoder.register_forward_hook(record, with_kwargs=True)
    try:
        model(dataclasses.replace(batch, dropout_seed=seed)).sum().backward()  # releases the runner's slot
    finally:
        hook.remove()
    return changes[0][: batch.num_tokens].double()


def _check_replays_at_two_seeds(model, runner, batch, *, tolerance: float) -> None:
    """``batch`` at two dropout seeds through the graphs, then eagerly: each replay equals
    the eager layers at its seed (relative to the norm), and the two seeds differ."""
    buckets, seeds = model.token_buckets, (11, 2**40 + 7)
    replays, eager_calls = runner.replays, runner.eager_calls
    graphed = [_stack_output_at_seed(model, batch, seed) for seed in seeds]
    assert runner.replays == replays + 2 * len(runner.units) and runner.eager_calls == eager_calls
    model.token_buckets = None  # unpadded: no captured set fits, the layers run eagerly
    try:
        eager = [_stack_output_at_seed(model, batch, seed) for seed in seeds]
    finally:
        model.token_buckets = buckets
    assert runner.eager_calls == eager_calls + 2 * len(runner.units)
    for seed, got, want in zip(seeds, graphed, eager):
        error = ((got - want).norm() / want.norm()).item()
        assert error < tolerance, f"seed {seed}: replay vs eager {error:.2e}"
    assert ((eager[0] - eager[1]).norm() / eager[0].norm()).item() > 0.1, "two seeds, two masks"


@pytest.mark.parametrize("mode", ["layers", "step"])
def test_replays_draw_each_steps_masks(megatron_cpu, tmp_path, mode):
    """The runner writes each seed's word table (and the batch's keys) into the captured
    tensors: the emulated graphs replayed at two seeds equal the eager layers."""
    from megatron_gr.training.model_setup import unwrap

    trainer, runner = _cpu_trainer(tmp_path, mode, dropout=0.3)
    model = unwrap(trainer.model[0])
    _check_replays_at_two_seeds(model, runner, trainer.loader.next_step()[0], tolerance=1e-5)


def _parameter_gradients(model, runner, batch) -> tuple[list, list]:
    """Gradients of the graphed units' parameters for ``batch``: (replayed, eager), from the
    same weights. autograd.grad: nothing accumulated, the DDP hooks stay out of it."""
    params = [param for unit in runner.units for param in unit.params]
    replays, buckets = runner.replays, model.token_buckets
    graphed = torch.autograd.grad(model(batch).sum(), params, allow_unused=True)  # releases the slot
    assert runner.replays == replays + len(runner.units)
    model.token_buckets = None  # unpadded: no captured set fits, the layers run eagerly
    try:
        eager = torch.autograd.grad(model(batch).sum(), params, allow_unused=True)
    finally:
        model.token_buckets = buckets
    return list(graphed), list(eager)


def _check_parameter_gradients(model, runner, batch, *, tolerance: float) -> None:
    graphed, eager = _parameter_gradients(model, runner, batch)
    names = {id(param): name for name, param in model.named_parameters()}
    params = [param for unit in runner.units for param in unit.params]
    assert len(params) > 4
    for param, got, want in zip(params, graphed, eager):
        name = names[id(param)]
        assert want is not None and want.norm() > 0, f"{name}: the eager step gives it no gradient"
        assert got is not None, f"{name}: no gradient from the replayed graphs"
        error = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert error < tolerance, f"{name}: replayed vs eager gradient {error:.2e}"


@pytest.mark.parametrize("mode", ["layers", "step"])
@pytest.mark.parametrize("hyper_connections", [False, True], ids=["plain", "mhc"])
def test_replayed_parameter_gradients_equal_eager_ones(megatron_cpu, tmp_path, mode, hyper_connections):
    """Every graphed parameter gets its gradient from the replayed backward, equal to the
    eager layers' and never None. The captures take gradients with respect to aliases of the
    parameters made by the forward; an emulated forward replay runs the work again on new
    aliases, so a backward that kept the first ones would get None, silently (allow_unused)."""
    from megatron_gr.training.model_setup import unwrap

    trainer, runner = _cpu_trainer(tmp_path, mode, hyper_connections=hyper_connections, dropout=0.3)
    model = unwrap(trainer.model[0])
    batch = trainer.loader.next_step()[0]
    for _ in range(2):  # the second forward replay makes new aliases again
        _check_parameter_gradients(model, runner, batch, tolerance=1e-5)


@pytest.mark.parametrize("mode", ["layers", "step"])
def test_captures_never_hand_the_parameters_a_gradient(megatron_cpu, tmp_path, mode):
    """What breaks a capture on the GPU: the parameters' gradient nodes (made on the default
    stream, kept alive by megatron's DDP) receiving a gradient produced on the capture
    stream. The warm-ups and captures take gradients with respect to the parameters'
    aliases, so no gradient reaches a parameter before training (a parameter's tensor hook
    sees every gradient handed to it, accumulated or returned by autograd.grad); a replayed
    backward then hands every parameter its gradient, as an eager one."""
    from megatron_gr.training.cuda_graphs import apply_cuda_graphs
    from megatron_gr.training.model_setup import unwrap

    trainer, _ = _cpu_trainer(tmp_path, "none", hyper_connections=True)
    model = unwrap(trainer.model[0])
    handed = []
    params = [param for param in model.decoder.parameters() if param.requires_grad]
    hooks = [param.register_hook(lambda grad, index=index: handed.append(index)) for index, param in enumerate(params)]
    try:
        runner = apply_cuda_graphs(model, mode=mode, max_tokens=512, num_slots=1, sequence_parallel_size=1,
                                   micro_batch_size=trainer.config.training.micro_batch_size, emulate=True)
        assert len(runner.captured) == len(runner.buckets.sizes)
        assert not handed, f"the captures handed {len(handed)} gradients to parameters"
        model(trainer.loader.next_step()[0]).sum().backward()
        assert runner.replays == len(runner.units)
        assert sorted(set(handed)) == list(range(len(params)))
    finally:
        for hook in hooks:
            hook.remove()


# ---------------------------------------------------------------------------------- GPU
def _gpu_trainer(tmp_path, mode: str, *, dropout: float = 0.0, hyper_connections: bool = False, seed: int = 5,
                 precision: str = "auto"):
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    model = {"hidden_dropout": dropout, "embedding_dropout": 0.0, "hidden_size": 64, "qk_head_dim": 32,
             "v_head_dim": 32, "enable_hyper_connections": hyper_connections}
    config = tiny_config(tmp_path, model=model, embeddings={"item": {"dim": 64}},
                         training={"device": "cuda", "kernel_backend": "triton", "cuda_graphs": mode, "seed": seed,
                                   "precision": precision})
    return Trainer(config)


def _losses(trainer, steps: int) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(steps)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode, hyper_connections", [("layers", False), ("step", False), ("layers", True),
                                                     ("step", True)])
def test_gpu_graphed_steps_train_as_eager_steps(tmp_path, mode, hyper_connections):
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    eager = _losses(_gpu_trainer(tmp_path / "eager", "none", hyper_connections=hyper_connections), 4)
    trainer = _gpu_trainer(tmp_path / "graphs", mode, hyper_connections=hyper_connections)
    graphed = _losses(trainer, 4)
    runner = graph_runner(unwrap(trainer.model[0]))
    assert runner is not None and runner.replays > 0 and runner.eager_calls == 0
    assert not runner.busy  # every micro-batch's backward ran its graphs
    # bf16: the padded batches run GEMMs of other shapes (another summation order).
    assert graphed == pytest.approx(eager, rel=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, hyper_connections", [("layers", False), ("step", True)])
def test_gpu_replays_at_two_seeds_equal_eager_layers(tmp_path, mode, hyper_connections):
    """Captured CUDA graphs (Triton dropout in the STU output and, with mHC, the merges)
    replayed at two dropout seeds draw each seed's masks: equal to the eager layers at that
    seed (fp32; the padded batch's GEMMs have other shapes), and different between seeds."""
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    trainer = _gpu_trainer(tmp_path, mode, dropout=0.3, hyper_connections=hyper_connections, precision="fp32")
    model = unwrap(trainer.model[0])
    _check_replays_at_two_seeds(model, graph_runner(model), trainer.loader.next_step()[0], tolerance=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, hyper_connections", [("layers", False), ("step", False), ("layers", True),
                                                     ("step", True)])
def test_gpu_replayed_parameter_gradients_equal_eager_ones(tmp_path, mode, hyper_connections):
    """The backward captures run on a side stream while megatron's DDP keeps the parameters'
    gradient nodes, made on the default stream, alive: capturing must not reach them
    (cudaErrorStreamCaptureImplicit otherwise). Then every graphed parameter's gradient from
    the replayed graphs equals the eager layers' (fp32, keyed dropout on), twice in a row."""
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    trainer = _gpu_trainer(tmp_path, mode, dropout=0.3, hyper_connections=hyper_connections, precision="fp32")
    model = unwrap(trainer.model[0])
    runner = graph_runner(model)
    assert runner is not None and runner.capture_memory_bytes > 0
    batch = trainer.loader.next_step()[0]
    for _ in range(2):
        _check_parameter_gradients(model, runner, batch, tolerance=2e-3)  # CPU, emulated: < 1e-6


@pytest.mark.gpu
def test_gpu_batches_past_the_last_bucket_run_eagerly(tmp_path):
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    trainer = _gpu_trainer(tmp_path, "layers")
    runner = graph_runner(unwrap(trainer.model[0]))
    assert runner.capture_memory_bytes > 0 and len(runner.captured) == len(runner.buckets.sizes)
    unwrap(trainer.model[0]).token_buckets = None  # unpadded: no captured shape fits
    trainer.train_step()
    assert runner.eager_calls > 0
