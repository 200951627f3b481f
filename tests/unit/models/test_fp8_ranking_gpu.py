"""FP8 ranking models on a GPU (skipped without one), bf16 activations and weights, the
Triton casts and the plan-time FP8 check as a real run has them:

- the tower's FP8 fusion layer (a padded size) against the bf16 linear: forward and
  gradients within the FP8 precision bound of the operands (e4m3 forward: u = 2^-4; e5m2
  gradients: 2^-3), as the STU linears' GPU tests state it;
- DLRM-HSTU and ULTRA-HSTU trained in FP8 for 20 steps against the same runs in bf16
  (same seed, same batches): every step's loss within 5% of bf16's and the mean distance
  within 2% (a lost scale or a wrong operand is off by O(1) at the first step).

Both run on the GPU for real: the tower's linear needs no process group, and the training
runs share the module's CUDA runtime (``megatron_runtime``: NCCL). Never ``megatron_cpu``
here: its CPU mode sends ``device="cuda"`` tensors to the CPU, and its gloo group crashed
the distributed optimizer of a CUDA run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gr.training.trainer import Trainer
from tests.unit.models.test_ultra_model import CLICK, IMP
from tests.unit.training.helpers import read_records
from tests.unit.training.test_fp8_ranking_training import CHANNELS, config
from tests.unit.transformer.test_fp8_linear import fp8_config, relative

pytestmark = pytest.mark.gpu

RECIPES = pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])


@RECIPES
def test_tower_fp8_linear_tracks_bf16(recipe):
    from megatron_gr.transformer.fp8.replicated_linear import Fp8Linear

    torch.manual_seed(0)
    fp8 = Fp8Linear(1028, 520, config=fp8_config(fp8_recipe=recipe)).cuda().bfloat16()
    assert fp8.weight.is_cuda  # on the GPU: the Triton cast and CUDA's _scaled_mm
    plain = torch.nn.Linear(1028, 520).cuda().bfloat16()
    plain.load_state_dict(fp8.state_dict())
    x = torch.randn(3001, 1028, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(3001, 520, device="cuda", dtype=torch.bfloat16) * 1e-3
    results = []
    for linear in (fp8, plain):
        inputs = x.clone().requires_grad_()
        out = linear(inputs)
        out.backward(grad)
        results.append((out.detach(), inputs.grad, linear.weight.grad))
    for name, got, want, bound in zip(("y", "dx", "dw"), *results, (2**-4, 2**-3, 2**-3)):
        assert relative(got, want) < bound, name


def train_losses(run) -> list[float]:
    Trainer(run).train()
    return [r["loss"] for r in read_records(run.logging.metrics_file)]


def gpu_run(tmp_path, model, features=None):
    return config(tmp_path, model=model, features=features, train_iters=20, device="cuda")


@RECIPES
@pytest.mark.parametrize("variant", ["dlrm_hstu", "ultra_hstu"])
def test_fp8_ranking_training_tracks_bf16(megatron_runtime, tmp_path, recipe, variant):
    assert megatron_runtime.device.type == "cuda" and torch.distributed.get_backend() == "nccl"
    model, features = {}, None
    if variant == "ultra_hstu":
        model, features = {"transducers": CHANNELS, "recompute_uvqk": recipe != "delayed"}, {**IMP, **CLICK}
    bf16 = train_losses(gpu_run(tmp_path / "bf16", model, features))
    fp8 = train_losses(gpu_run(tmp_path / "fp8", {**model, "fp8": "hybrid", "fp8_recipe": recipe}, features))
    distance = np.abs(np.array(fp8) - np.array(bf16)) / np.array(bf16)
    assert len(fp8) == len(bf16) == 20 and np.all(np.isfinite(fp8))
    assert distance.max() < 0.05 and distance.mean() < 0.02, (fp8, bf16)
