"""The run plan decides and checks every run-level setting before anything is built: the
kernel backend (one setting, old names translated with a notice), the batch arithmetic,
the layout against the world size, writable outputs, the filled model config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_gr.config import ConfigError, ExperimentConfig
from megatron_gr.ops.backend import KernelBackend, resolve_backend
from megatron_gr.training.plan import make_plan


def plan_of(raw: dict, **kwargs):
    return make_plan(ExperimentConfig.from_dict(raw), **kwargs)


def test_auto_backend_is_pytorch_on_a_cpu_and_triton_on_a_gpu_with_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is for tests: auto never picks it
    assert resolve_backend("auto", torch.device("cpu")) is KernelBackend.PYTORCH
    assert resolve_backend("auto", torch.device("cuda", 0)) is KernelBackend.TRITON  # triton is installed here
    assert plan_of({"training": {"device": "cpu"}}).backend is KernelBackend.PYTORCH


def test_triton_on_a_cpu_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"training.kernel_backend='triton'.*CUDA devices only.*--kernel-backend pytorch"):
        plan_of({"training": {"device": "cpu", "kernel_backend": "triton"}})
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # tests run the kernels on a CPU this way
    assert plan_of({"training": {"device": "cpu", "kernel_backend": "triton"}}).backend is KernelBackend.TRITON


def test_attention_kernel_triton_on_a_cpu_is_one_line_before_anything_is_built():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--attention-kernel", "triton", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    err = [line for line in result.stderr.strip().splitlines() if "Transformer Engine and Apex" not in line and "warnings.warn" not in line]
    assert result.returncode == 2
    assert err[0].startswith("notice: model.attention_kernel is deprecated") and "--kernel-backend" in err[0]
    assert len(err) == 2 and err[1].startswith("error: training.kernel_backend='triton'"), err


@pytest.mark.parametrize("old, backend", [
    ({"model": {"attention_kernel": "triton"}}, "triton"),
    ({"model": {"attention_kernel": "pytorch"}}, "pytorch"),
    ({"model": {"enable_hyper_connections": True, "use_fused_mhc": True}}, "triton"),
    ({"embeddings": {"item": {"type": "dynamic", "dynamic": {"kernel": "auto"}}}}, "auto"),
])
def test_old_kernel_keys_still_work_with_a_notice(capsys, old, backend):
    config = ExperimentConfig.from_dict(old)
    assert config.training.kernel_backend == backend
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("notice:") and "deprecated" in line and "training.kernel_backend" in line


@pytest.mark.parametrize("raw, words", [
    ({"model": {"attention_kernel": "triton", "use_fused_mhc": False}}, ["ask for different kernel backends"]),
    ({"model": {"attention_kernel": "triton"}, "training": {"kernel_backend": "pytorch"}}, ["contradicts", "drop the old key"]),
    ({"model": {"use_fused_mhc": "yes"}}, ["model.use_fused_mhc='yes'", "true or false"]),
])
def test_contradicting_kernel_keys_are_an_error(raw, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)
    for word in words:
        assert word in str(caught.value)


def test_the_query_time_bias_needs_the_pytorch_attention(monkeypatch):
    query = {"model": {"time_bias_origin": "query"}}
    cuda = torch.device("cuda", 0)
    assert plan_of({**query, "training": {"kernel_backend": "auto"}}, device=cuda).backend is KernelBackend.PYTORCH
    assert plan_of({"training": {"kernel_backend": "auto"}}, device=cuda).backend is KernelBackend.TRITON
    with pytest.raises(ConfigError, match=r"model.time_bias_origin='query' needs the PyTorch attention"):
        plan_of({**query, "training": {"kernel_backend": "triton"}}, device=cuda)


def test_layout_and_batch_arithmetic_are_checked_against_the_world_size():
    plan = plan_of({"training": {"device": "cpu", "micro_batch_size": 4, "global_batch_size": 32},
                    "parallel": {"tensor_model_parallel_size": 2}}, world_size=4)
    assert (plan.layout.tensor, plan.layout.pipeline, plan.layout.data) == (2, 1, 2)
    assert plan.global_batch_size == 32 and plan.micro_batches_per_rank == 4
    assert plan.micro_batch_balance == "attention_cost"  # auto with 2 data-parallel ranks
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        plan_of({"training": {"device": "cpu"}, "parallel": {"tensor_model_parallel_size": 2}}, world_size=3)
    with pytest.raises(ConfigError, match=r"global_batch_size=24 must be a multiple of micro_batch_size x data-parallel size = 4 x 4"):
        plan_of({"training": {"device": "cpu", "micro_batch_size": 4, "global_batch_size": 24}}, world_size=4)


def test_the_model_config_is_filled_once():
    plan = plan_of({"model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 2},
                    "embeddings": {"item": {"dim": 32}},
                    "training": {"device": "cpu"},
                    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                 "sequence_parallel": True}}, world_size=4)
    model = plan.model_config
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (4, 32, 2)
    assert (model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.sequence_parallel) == (2, 2, True)
    assert model.params_dtype == torch.float32 and not model.bf16 and model.calculate_per_token_loss
    assert model is not plan.config.model  # the user's section is left as it was read
    assert plan.config.model.tensor_model_parallel_size == 1


def test_a_too_small_item_table_is_refused():
    with pytest.raises(ConfigError, match=r"embeddings.item.num_embeddings=10 is too small for 20 items"):
        plan_of({"embeddings": {"item": {"num_embeddings": 10}}, "training": {"device": "cpu"}}, num_items=20)


def a_file(tmp):
    (tmp / "file").write_text("x")
    return tmp / "file"


def a_directory(tmp):
    (tmp / "dir").mkdir()
    return tmp / "dir"


@pytest.mark.parametrize("key, make, words", [
    ("checkpoint.save", a_file, "a file is in the way"),
    ("checkpoint.save", lambda tmp: a_file(tmp) / "sub", "is a file, not a directory"),
    ("logging.metrics_file", a_directory, "it is a directory"),
    ("logging.tensorboard_dir", lambda tmp: "/proc/megatron_gr_cannot_write_here/tb", "is not writable"),
    ("logging.metrics_file", lambda tmp: "/proc/megatron_gr_cannot_write_here.jsonl", "is not writable"),
])
def test_unwritable_outputs_stop_the_run_before_it_starts(tmp_path, key, make, words):
    section, field = key.split(".")
    path = str(make(tmp_path))
    with pytest.raises(ConfigError) as caught:
        plan_of({section: {field: path}, "training": {"device": "cpu"}})
    message = str(caught.value)
    assert message.startswith(f"{key}={path!r} cannot be written") and words in message, message
    assert "\n" not in message


def test_writable_outputs_are_not_created_by_the_check(tmp_path):
    save, metrics = tmp_path / "a" / "b", tmp_path / "c" / "m.jsonl"
    plan_of({"checkpoint": {"save": str(save)}, "logging": {"metrics_file": str(metrics)}, "training": {"device": "cpu"}})
    assert not save.exists() and not metrics.parent.exists() and list(tmp_path.iterdir()) == []
