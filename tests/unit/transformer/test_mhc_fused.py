"""Blocks of hyper-connection layers on the fused mHC kernels (the Triton backend): the same
outputs and gradients as on the PyTorch reference (no dropout), and under mHC recompute
bitwise the outputs and gradients of the fused run without recompute (dropout on: the
replayed merge draws the mask again from the restored generator). CPU: Triton
interpreter, two small layers."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()
if DEVICE != "cpu":
    pytest.skip("CPU-mode megatron blocks (the GPU runs these kernels in tests/unit/ops)", allow_module_level=True)

from megatron_gr.transformer.hyper_connection import HyperConnectionModule  # noqa: E402
from tests.unit.transformer.helpers import build, config, jagged, run  # noqa: E402


def small_inputs(kind: str):
    g = torch.Generator().manual_seed(3)
    if kind == "stu":
        params, _ = jagged([5, 1, 6], seed=4)
        return torch.randn(12, 1, 32, generator=g), {"attention_mask": None, "packed_seq_params": params}
    return torch.randn(5, 2, 32, generator=g), {"attention_mask": None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("kind", ["stu", "transformer"])
def test_fused_block_is_as_accurate_as_the_reference_block(megatron_cpu, kind):
    """Output, input gradient and every parameter gradient of the fused block against a
    float64 reference block: within 3x the float32 reference's own error, or 1e-5 (sums over
    tokens such as the gate gradients lose a few 1e-6 in float32 either way)."""
    # The initial weights come from the global generator: fix them, so the result does not
    # depend on which tests ran before. The alpha gradients (sums that nearly cancel) are
    # ill-conditioned: about 1 initialisation in 30 puts the fused error above the bound.
    torch.manual_seed(0)
    blocks = {}
    variants = {"reference": {}, "fused": {}, "float64": dict(params_dtype=torch.float64)}
    for name, extra in variants.items():
        cfg = config(kind, recompute=False, num_layers=2, hidden_dropout=0.0, **extra)
        blocks[name] = build(kind, cfg, backend="triton" if name == "fused" else "pytorch")
        if name != "reference":
            blocks[name].load_state_dict(blocks["reference"].state_dict())
    assert {m.kernel for m in blocks["fused"].modules() if isinstance(m, HyperConnectionModule)} == {"triton"}
    x, kwargs = small_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    results = {name: run(block, x.to(torch.float64 if name == "float64" else torch.float32), kwargs, rng_states)
               for name, block in blocks.items()}

    def flat(result):
        out, dx, grads, _, _ = result
        return {"out": out, "dx": dx, **grads}

    exact, reference, fused = (flat(results[k]) for k in ("float64", "reference", "fused"))
    for name, want in exact.items():
        ours, theirs = relative(fused[name], want), relative(reference[name], want)
        assert ours <= max(3 * theirs, 1e-5), f"{name}: fused {ours:.1e}, float32 reference {theirs:.1e}"


@pytest.mark.parametrize("kind", ["stu", "transformer"])
def test_fused_block_under_recompute_gives_identical_gradients(megatron_cpu, kind):
    plain = build(kind, config(kind, recompute=False, num_layers=2), backend="triton")
    recomputed = build(kind, config(kind, recompute_layers=1, num_layers=2), backend="triton")
    recomputed.load_state_dict(plain.state_dict())
    assert len(recomputed.recompute_groups()) == 2
    x, kwargs = small_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    out_a, dx_a, grads_a, held_a, _ = run(plain, x, kwargs, rng_states)
    out_b, dx_b, grads_b, held_b, _ = run(recomputed, x, kwargs, rng_states)
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
    assert held_b < held_a, (held_a, held_b)
