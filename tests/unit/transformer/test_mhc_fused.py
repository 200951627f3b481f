"""Blocks of hyper-connection layers on the fused mHC kernels (the Triton backend, where the
blocks fuse the expansion and the contraction, and with ``mhc_fuse_merge_pre`` (``pairs``)
each merge with the next pre op): as
accurate as the PyTorch reference and as the same kernels run one op at a time (no
dropout); the same as both with dropout on (every merge, fused or not, in Triton or the
reference, draws the keyed mask of its tokens); under mHC recompute bitwise the outputs
and gradients of the fused run without recompute (dropout on: the replayed merge hashes
the same keys again), also across two pipeline stages. CPU: Triton interpreter, small
layers."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()
if DEVICE != "cpu":
    pytest.skip("CPU-mode megatron blocks (the GPU runs these kernels in tests/unit/ops)", allow_module_level=True)

from megatron_gr.transformer.hyper_connection import HyperConnectionModule  # noqa: E402
from tests.unit.transformer.helpers import build, config, jagged, run, run_two_stages  # noqa: E402


def small_inputs(kind: str):
    g = torch.Generator().manual_seed(3)
    if kind == "stu":
        params, _ = jagged([5, 1, 6], seed=4)
        return torch.randn(12, 1, 32, generator=g), {"attention_mask": None, "packed_seq_params": params}
    return torch.randn(5, 2, 32, generator=g), {"attention_mask": None}


def relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """``|a - b| / |scale|`` (``scale``: ``b`` unless given)."""
    scale = b if scale is None else scale
    return ((a - b).double().norm() / scale.double().norm().clamp(min=1e-30)).item()


def error_scale(results: dict, name: str) -> torch.Tensor:
    """What an error of ``name`` is measured against: the float64 result itself, except for
    the gates ``alpha`` (3 per hyper-connection). Their gradient is a sum of T x W products
    of both signs that cancel (``alpha_k d alpha_k = <P_k, d P_k>``, P_k the gate's
    projection rows), down to 4e-4 of the size of its summands here, so its float32 error
    relative to its own value depends on the order of the sums and the thread count (1
    thread: 2e-3 fused, 6e-4 reference). The summands' size, ``|P_k| |d P_k| / alpha_k``,
    is that of the module's gradient (about 2x it here): the error is measured against the
    float64 gradient of the whole hyper-connection module (projection, alpha, bias)."""
    if not name.endswith("alpha"):
        return results[name]
    module = name[: -len("alpha")]
    return torch.cat([results[module + part].flatten() for part in ("projection", "alpha", "bias")])


@pytest.mark.parametrize("pairs", [False, True], ids=["merge_then_pre", "merge_pre_pairs"])
@pytest.mark.parametrize("kind", ["stu", "transformer"])
def test_fused_block_is_as_accurate_as_the_reference_block(megatron_cpu, kind, pairs):
    """Output, input gradient and every parameter gradient of the fused block against a
    float64 reference block: within 3x the error of the float32 reference or of the same
    kernels run one op at a time, or 1e-5 (sums over tokens lose a few 1e-6 in float32
    either way), errors relative to :func:`error_scale`."""
    # The initial weights come from the global generator: fix them, so the result does not
    # depend on which tests ran before.
    torch.manual_seed(0)
    blocks = {}
    variants = {"reference": ({}, "pytorch", {}), "fused": ({}, "triton", {}),
                "separate": ({}, "triton", dict(fuse_merges=False)),
                "float64": (dict(params_dtype=torch.float64), "pytorch", {})}
    for name, (extra, backend, stage) in variants.items():
        cfg = config(kind, recompute=False, num_layers=2, hidden_dropout=0.0, mhc_fuse_merge_pre=pairs, **extra)
        blocks[name] = build(kind, cfg, backend=backend, **stage)
        if name != "reference":
            blocks[name].load_state_dict(blocks["reference"].state_dict())
    assert {m.kernel for m in blocks["fused"].modules() if isinstance(m, HyperConnectionModule)} == {"triton"}
    assert blocks["fused"].fuse_merges and not blocks["separate"].fuse_merges
    x, kwargs = small_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    results = {name: flat(run(block, x.to(torch.float64 if name == "float64" else torch.float32), kwargs, rng_states))
               for name, block in blocks.items()}
    for name, want in results["float64"].items():
        scale = error_scale(results["float64"], name)
        ours = relative(results["fused"][name], want, scale)
        theirs = max(relative(results[k][name], want, scale) for k in ("reference", "separate"))
        assert ours <= max(3 * theirs, 1e-5), f"{name}: fused {ours:.1e}, float32 reference / separate {theirs:.1e}"


@pytest.mark.parametrize("pairs", [False, True], ids=["merge_then_pre", "merge_pre_pairs"])
@pytest.mark.parametrize("kind", ["stu", "transformer"])
def test_fused_block_with_dropout_matches_the_separate_kernels_and_the_reference(megatron_cpu, kind, pairs):
    """Dropout 0.3: the fused ops draw the keyed masks the separate merges draw, in Triton
    and in the PyTorch reference, so the blocks agree to float32 rounding (the outputs to
    1e-6; gradients of the map parameters, sums that cancel, to 1e-3: a mask drawn
    differently moves every result by order one)."""
    cfg = config(kind, recompute=False, num_layers=2, mhc_fuse_merge_pre=pairs)
    fused = build(kind, cfg, backend="triton")
    others = {"separate": build(kind, cfg, backend="triton", fuse_merges=False),
              "reference": build(kind, cfg, backend="pytorch")}
    x, kwargs = small_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    ours = flat(run(fused, x, kwargs, rng_states))
    for other, block in others.items():
        block.load_state_dict(fused.state_dict())
        theirs = flat(run(block, x, kwargs, rng_states))
        for name, want in theirs.items():
            bound = 1e-3 if "hyper_connection" in name else 1e-5 if "." in name else 1e-6
            assert relative(ours[name], want) <= bound, f"{other} {name}: {relative(ours[name], want):.1e}"


def flat(result) -> dict:
    out, dx, grads, _, _ = result
    return {"out": out, "dx": dx, **grads}


@pytest.mark.parametrize("pairs", [False, True], ids=["merge_then_pre", "merge_pre_pairs"])
@pytest.mark.parametrize("kind", ["stu", "transformer"])
def test_fused_block_under_recompute_gives_identical_gradients(megatron_cpu, kind, pairs):
    plain = build(kind, config(kind, recompute=False, num_layers=2, mhc_fuse_merge_pre=pairs), backend="triton")
    recomputed = build(kind, config(kind, recompute_layers=1, num_layers=2, mhc_fuse_merge_pre=pairs), backend="triton")
    recomputed.load_state_dict(plain.state_dict())
    assert len(recomputed.recompute_groups()) == 2 and recomputed.fuse_merges
    x, kwargs = small_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    out_a, dx_a, grads_a, held_a, _ = run(plain, x, kwargs, rng_states)
    out_b, dx_b, grads_b, held_b, _ = run(recomputed, x, kwargs, rng_states)
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
    assert held_b < held_a, (held_a, held_b)


@pytest.mark.parametrize("kind", ["stu", "transformer"])
def test_fused_stages_under_recompute_give_identical_gradients(megatron_cpu, kind):
    """Two pipeline stages of one layer each: the first stage's merge runs alone before it
    sends the streams; with recompute, the stage output is its recompute block's output."""
    stages = []
    for cfg in (config(kind, recompute=False, num_layers=1), config(kind, recompute_layers=1, num_layers=1)):
        first = build(kind, cfg, backend="triton", post_process=False)
        last = build(kind, cfg, backend="triton", pre_process=False)
        if stages:
            first.load_state_dict(stages[0][0].state_dict())
            last.load_state_dict(stages[0][1].state_dict())
        stages.append((first, last))
    x, kwargs = small_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    sent_a, out_a, dx_a, grads_a = run_two_stages(*stages[0], x, kwargs, rng_states)
    sent_b, out_b, dx_b, grads_b = run_two_stages(*stages[1], x, kwargs, rng_states)
    assert torch.equal(sent_a, sent_b) and torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
