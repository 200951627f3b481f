"""training.cuda_graphs: the config and plan guards (one line each, CPU), and on a GPU the
graphed step training as the eager step (bf16 tolerance), dropout drawing new masks on
every replay, and the runner's bookkeeping."""

from __future__ import annotations

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


def test_supported_combinations_pass():
    layers = _config(training={"cuda_graphs": "layers"}, model={"enable_hyper_connections": True})
    _check_cuda_graphs(layers, torch.device("cuda", 0), KernelBackend.TRITON, LAYOUT)  # PP, mHC: fine
    step = _config(training={"cuda_graphs": "step"})
    one_stage = ParallelLayout(world_size=1, tensor=1, pipeline=1, data=1, sequence_parallel=False)
    _check_cuda_graphs(step, torch.device("cuda", 0), KernelBackend.TRITON, one_stage)


# ------------------------------------------------- the runner's bookkeeping, emulated on the CPU
def _cpu_losses(tmp_path, mode: str, *, hyper_connections: bool, steps: int = 3):
    """Losses and final weights of a tiny CPU run; with ``mode`` its layers replayed through
    the graph runner with emulated graphs (the same static buffers, copies, padding, slots
    and autograd plumbing; the work re-run instead of a CUDA graph replayed)."""
    from megatron_gr.training.cuda_graphs import apply_cuda_graphs
    from megatron_gr.training.model_setup import unwrap
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    model = {"hidden_dropout": 0.0, "embedding_dropout": 0.0, "enable_hyper_connections": hyper_connections}
    trainer = Trainer(tiny_config(tmp_path, model=model))
    bare = unwrap(trainer.model[0])
    runner = None
    if mode != "none":
        runner = apply_cuda_graphs(bare, mode=mode, max_tokens=512, micro_batch_size=trainer.config.training.micro_batch_size,
                                   num_slots=1, sequence_parallel_size=1, emulate=True)
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


# ---------------------------------------------------------------------------------- GPU
def _gpu_trainer(tmp_path, mode: str, *, dropout: float = 0.0, hyper_connections: bool = False, seed: int = 5):
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    model = {"hidden_dropout": dropout, "embedding_dropout": 0.0, "hidden_size": 64, "qk_head_dim": 32,
             "v_head_dim": 32, "enable_hyper_connections": hyper_connections}
    config = tiny_config(tmp_path, model=model, embeddings={"item": {"dim": 64}},
                         training={"device": "cuda", "kernel_backend": "triton", "cuda_graphs": mode, "seed": seed})
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


def _replayed_losses(trainer, count: int) -> list[float]:
    """Forward and backward of one batch ``count`` times through the replayed layers."""
    from megatron_gr.training.cuda_graphs import graph_runner
    from megatron_gr.training.model_setup import unwrap

    model = unwrap(trainer.model[0])
    runner = graph_runner(model)
    batch = trainer.loader.next_step()[0]
    losses = []
    for _ in range(count):
        replays = runner.replays
        loss = model(batch).sum()
        loss.backward()  # releases the slot for the next forward
        assert runner.replays == replays + len(runner.units)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_gpu_dropout_draws_new_masks_on_every_replay(tmp_path):
    first, second = _replayed_losses(_gpu_trainer(tmp_path, "layers", dropout=0.3), 2)
    assert first != second
    first, second = _replayed_losses(_gpu_trainer(tmp_path / "quiet", "layers", dropout=0.0), 2)
    assert first == second


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
