"""An STU layer on the Triton kernels (attention and fused output path) equals the same
layer on the PyTorch references: output and every parameter gradient, with relative bias,
targets and semi-local attention. CPU: Triton interpreter, fp32; GPU: bf16 as trained."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams  # noqa: E402
from tests.unit.transformer.helpers import make_layer  # noqa: E402


@pytest.mark.parametrize("sla", [False, True])
def test_triton_layer_matches_pytorch_layer(megatron_runtime, sla):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    mask = dict(sla_k1=3, sla_k2=2) if sla else {}
    layers = {
        kernel: make_layer(bias=True, dtype=torch.float32, backend=kernel, max_seq_len=40, **mask)
        for kernel in ("pytorch", "triton")
    }
    layers["triton"].load_state_dict(layers["pytorch"].state_dict())
    lengths = [7, 1, 33]
    g = torch.Generator().manual_seed(4)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    ts = torch.cat([torch.sort(torch.randint(0, 90, (n,), generator=g))[0] for n in lengths]).to(DEVICE)
    targets = torch.tensor([2, 0, 3], device=DEVICE)
    x = torch.randn(sum(lengths), 1, 8, generator=g).to(DEVICE)
    results = {}
    for kernel, layer in layers.items():
        layer = layer.to(DEVICE, dtype)
        params = JaggedSeqParams.from_offsets(offsets, max(lengths), timestamps=ts, num_targets=targets)
        inp = x.to(dtype).requires_grad_()
        out, _ = layer(inp, packed_seq_params=params)
        grads = torch.autograd.grad(out, [inp, *layer.parameters()], torch.ones_like(out))
        results[kernel] = [out, *grads]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in zip(results["triton"], results["pytorch"]):
        error = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
        assert error < tolerance, error
