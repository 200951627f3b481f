"""FP8 settings: megatron's fields and our flags reach the model config; settings FP8
cannot honour are one-line errors at config time, and asking for FP8 where it cannot run
(the CPU, a GPU without FP8 tensor cores, fp32, STU sizes that are not multiples of 16,
GEMMs this torch build rejects) is one when the run is planned. Never a silent no-op."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.cli import main
from megatron_gr.config import ConfigError, ExperimentConfig, fp8_validation
from megatron_gr.training.plan import make_plan
from megatron_gr.transformer.fp8 import backend

FP8 = {"fp8": "hybrid"}
# the embedded default model is hidden 64, 2 heads of 32: FP8-friendly sizes
BAD_MODELS = [
    ({"fp8": "fp16"}, ["model.fp8='fp16'", "'e4m3', 'hybrid'"]),
    ({**FP8, "fp8_recipe": "current"}, ["model.fp8_recipe='current'", "'rowwise'"]),
    ({**FP8, "fp8_recipe": "mxfp8"}, ["fp8_recipe='mxfp8' needs Transformer Engine", "delayed, tensorwise, rowwise"]),
    ({"fp8_recipe": "rowwise"}, ["fp8_recipe='rowwise' has no effect without fp8", "--fp8-format"]),
    ({"fp8_amax_history_len": 16}, ["fp8_amax_history_len=16 has no effect without fp8"]),
    ({**FP8, "fp8_recipe": "tensorwise", "fp8_amax_history_len": 16},
     ["fp8_amax_history_len=16 has no effect with fp8_recipe='tensorwise'"]),
    ({**FP8, "fp8_recipe": "rowwise", "fp8_amax_compute_algo": "max"},
     ["fp8_amax_compute_algo='max' has no effect with fp8_recipe='rowwise'"]),
    ({**FP8, "fp8_amax_history_len": 0}, ["model.fp8_amax_history_len=0", ">= 1"]),
    ({**FP8, "fp8_amax_compute_algo": "mean"}, ["model.fp8_amax_compute_algo='mean'"]),
    ({**FP8, "fp8_margin": -1}, ["model.fp8_margin=-1", "[0, 32]"]),
    ({**FP8, "recompute_granularity": "selective", "recompute_modules": ["mlp"]},
     ["recompute_modules holds 'mlp'", "Transformer Engine"]),
]


@pytest.mark.parametrize("model, words", BAD_MODELS, ids=[str(i) for i in range(len(BAD_MODELS))])
def test_bad_fp8_setting_is_a_clear_error(model, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({"model": model})
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_transformer_engine_backend_rejects_the_native_recipe(monkeypatch):
    monkeypatch.setattr(fp8_validation, "transformer_engine_available", lambda: True)
    with pytest.raises(ConfigError, match="fp8_recipe='rowwise' is a recipe of the native FP8 linears"):
        ExperimentConfig.from_dict({"model": {**FP8, "fp8_recipe": "rowwise"}})
    with pytest.raises(ConfigError, match="enable_hyper_connections=True is supported by the native FP8 linears only"):
        ExperimentConfig.from_dict({"model": {**FP8, "enable_hyper_connections": True}})


def test_flags_reach_megatrons_fields(capsys):
    code = main(["show-config", "--fp8-format", "e4m3", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "16",
                 "--fp8-amax-compute-algo", "max", "--fp8-margin", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("fp8: e4m3", "fp8_recipe: delayed", "fp8_amax_history_len: 16", "fp8_amax_compute_algo: max",
                 "fp8_margin: 1"):
        assert line in out, line
    config = ExperimentConfig.from_dict({"model": {**FP8, "fp8_recipe": "rowwise", "enable_hyper_connections": True}})
    assert ExperimentConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def planned_model(config: ExperimentConfig, device: str, *, bf16: bool = True):
    """The model config a run on ``device`` builds (the plan checks FP8 against it)."""
    if not bf16:
        config = ExperimentConfig.from_dict({**config.to_dict(), "training": {**config.to_dict()["training"], "precision": "fp32"}})
    where = torch.device(device, 0) if device == "cuda" else torch.device(device)
    return make_plan(config, device=where, world_size=1).model_config


def test_fp8_on_the_cpu_is_refused_when_the_run_is_planned():
    config = ExperimentConfig.from_dict({"model": FP8})
    with pytest.raises(ConfigError, match=r"^model.fp8='hybrid' \(fp8_recipe='delayed'\) cannot run here: .* on the "
                                          r"CPU; unset model.fp8 to train in bf16$"):
        planned_model(config, "cpu", bf16=False)
    plain = ExperimentConfig.from_dict({})
    assert planned_model(plain, "cpu", bf16=False).fp8 is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a given compute capability, without one (the checks before any GEMM)."""
    def install(capability, gemm_problem=None):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(backend, "_scaled_mm_problem", lambda recipe, index: gemm_problem)
        monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object())
    return install


def test_gpus_without_fp8_tensor_cores_and_unfit_runs_are_refused(fake_gpu):
    config = ExperimentConfig.from_dict({"model": {**FP8, "fp8_recipe": "rowwise"}})
    fake_gpu((8, 0))
    with pytest.raises(ConfigError, match="Fake GPU has compute capability 8.0; FP8 tensor cores need >= 8.9"):
        planned_model(config, "cuda")
    fake_gpu((9, 0))
    with pytest.raises(ConfigError, match="training.precision=bf16"):
        planned_model(config, "cuda", bf16=False)
    odd = ExperimentConfig.from_dict({"model": {**FP8, "hidden_size": 40}, "embeddings": {"item": {"dim": 40}}})
    with pytest.raises(ConfigError, match="hidden_size = 40 is not a multiple of 16"):
        planned_model(odd, "cuda")
    heads = ExperimentConfig.from_dict({"model": {**FP8, "v_head_dim": 20, "qk_head_dim": 20}})
    with pytest.raises(ConfigError, match=r"output projection inputs per rank, TP=1\) = 40"):
        planned_model(heads, "cuda")
    fake_gpu((9, 0), gemm_problem="torch._scaled_mm rejects the gradient GEMM (e5m2 x e4m3): not supported")
    with pytest.raises(ConfigError, match="rejects the gradient GEMM"):
        planned_model(config, "cuda")
    fake_gpu((9, 0))
    assert planned_model(config, "cuda").fp8_recipe == "rowwise"

