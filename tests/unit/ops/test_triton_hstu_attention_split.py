"""The Triton HSTU attention with queries and keys in different layouts (context
parallelism, :class:`~megatron_gr.ops.key_layout.KeyLayout`): a batch split over simulated
ranks, each rank's query segments run through the kernels against their own keys, equals the
unsplit float64 reference (output and every gradient), for every mask with the relative
bias (both of its tile paths), both backward variants, atomic dq, and 16-bit inputs. Chunk boundaries fall inside
kernel blocks (blocks of 16 in the interpreter; chunks of 11-12 and 17-18 tokens), so the
first query block of a chunk starts before its first row. ``hstu_attention_backward`` (the
kernels' backward without autograd) equals autograd.

Without a GPU the kernels run in the Triton interpreter; tests marked ``gpu`` run the
compiled kernels at larger shapes.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.hstu_attention import hstu_attention, hstu_attention_backward  # noqa: E402
from megatron_gr.ops.relative_bias import RelativeBiasInputs  # noqa: E402
from megatron_gr.ops.triton import hstu_configs  # noqa: E402
from megatron_gr.transformer.context_parallel import plan_context_split  # noqa: E402
from tests.unit.transformer.context_parallel_helpers import (  # noqa: E402
    MASKS,
    key_layout_of,
    offsets_of,
    split_attention,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
LENGTHS = [1, 45, 70, 0, 17, 9]  # 45 and 70 split at threshold 20 (CP = 2: chunks of 11-12, 17-18)


def make_inputs(lengths, *, dtype, device, seed=0, dqk=16, dv=16):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(total, 2, dqk), rand(total, 2, dqk), rand(total, 2, dv)
    gaps = torch.randint(0, 40, (total,), generator=g) + (torch.rand(total, generator=g) < 0.05) * 10**9
    rel = RelativeBiasInputs(
        position_weights=torch.randn(9, generator=g).to(device).requires_grad_(),
        time_weights=torch.randn(7, generator=g).to(device).requires_grad_(),
        timestamps=torch.cumsum(gaps, 0).to(device),
    )
    return q, k, v, rel


def check_split(lengths, *, mask, dtype, device, size=2, threshold=20, seed=0, normalizer="max_seq_len", **dims):
    q, k, v, rel = make_inputs(lengths, dtype=dtype, device=device, seed=seed, **dims)
    mask = dict(mask)
    targets = torch.tensor([min(3, n // 2) for n in lengths], device=device) if mask.pop("targets", False) else None
    kwargs = dict(max_seq_len=max(lengths) + 3, alpha=0.7, normalizer=normalizer, num_targets=targets, **mask)
    out = split_attention(q, k, v, lengths, size=size, threshold=threshold, relative_bias=rel, kernel="triton", **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    leaves = [q, k, v, rel.position_weights, rel.time_weights]
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_bias = RelativeBiasInputs(ref_leaves[3], ref_leaves[4], rel.timestamps)
    ref = hstu_attention(*ref_leaves[:3], offsets_of(lengths).to(device), relative_bias=ref_bias, **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for name, got, want in zip(["out", "dq", "dk", "dv", "d_position", "d_time"], [out, *grads], [ref, *ref_grads]):
        assert torch.isfinite(got).all(), name
        error = ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()
        tolerance = TOLERANCE[dtype] * (3 if name.startswith("d_") and dtype != torch.float32 else 1)
        assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run where there is no GPU")


@cpu_only
@pytest.mark.parametrize("mask", ["causal", "all", "bidirectional_all"])
def test_interpreter_split_equals_whole(mask):
    check_split(LENGTHS, mask=MASKS[mask], dtype=torch.float32, device="cpu")


@cpu_only
def test_interpreter_split_backward_three_ranks_seq_len_normaliser():
    """dv, dk and dq in three launches with their own blocks; CP = 3 (6 chunks)."""
    backward = hstu_configs.KernelConfig(
        16, 32, num_warps=1, num_stages=1, split_dkdv=True,
        dk=hstu_configs.KernelConfig(32, 16, num_warps=1, num_stages=1),
        dq=hstu_configs.KernelConfig(32, 16, num_warps=1, num_stages=1),
    )
    with hstu_configs.override(backward=backward):
        check_split(LENGTHS, mask=MASKS["sla"], dtype=torch.float32, device="cpu", size=3, normalizer="seq_len")


@cpu_only
def test_interpreter_atomic_dq_and_uneven_blocks():
    forward = hstu_configs.KernelConfig(32, 16, num_warps=1, num_stages=1)
    backward = hstu_configs.KernelConfig(16, 32, num_warps=1, num_stages=1, atomic_dq=True)
    with hstu_configs.override(forward=forward, backward=backward):
        check_split(LENGTHS, mask=MASKS["all"], dtype=torch.float32, device="cpu")


@cpu_only
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform_tiles", "per_pair"])
def test_interpreter_split_relative_bias_tile_paths(uniform):
    """The relative bias's two tile paths under split layouts: whether a tile is far from the
    diagonal or past the last time bucket is decided at whole-sequence positions."""
    with hstu_configs.override(uniform_bias_tiles=uniform):
        check_split(LENGTHS, mask=MASKS["causal"], dtype=torch.float32, device="cpu")


@cpu_only
def test_interpreter_bf16():
    check_split([2, 41, 7], mask=MASKS["all"], dtype=torch.bfloat16, device="cpu", threshold=16)


@cpu_only
def test_interpreter_backward_entry_point_equals_autograd():
    """What context parallelism calls in its backward, odd head dims (padded) included."""
    q, k, v, rel = make_inputs(LENGTHS, dtype=torch.float32, device="cpu", dqk=12, dv=10)
    plan = plan_context_split(LENGTHS, size=2, rank=1, split_threshold=20)
    tokens, keys = torch.from_numpy(plan.token_index), torch.from_numpy(plan.key_token)
    bias = RelativeBiasInputs(rel.position_weights, rel.time_weights, rel.timestamps[tokens])
    inputs = [t.detach()[index].requires_grad_() for t, index in ((q, tokens), (k, keys), (v, keys))]
    args = dict(max_seq_len=80, alpha=0.7, relative_bias=bias, key_layout=key_layout_of(plan, rel.timestamps),
                max_attn_len=6, global_prefix_len=5, kernel="triton")
    offsets = offsets_of(plan.segment_length)
    out = hstu_attention(*inputs, offsets, **args)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, inputs + [rel.position_weights, rel.time_weights], grad)
    got = hstu_attention_backward(grad, *[t.detach() for t in inputs], offsets, **args)
    for name, a, b in zip(["dq", "dk", "dv", "d_position", "d_time"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


# ---------------------------------------------------------------- GPU (compiled kernels)

GPU_LENGTHS = [1, 300, 1031, 64, 0, 2517]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", hstu_configs.BACKWARD_VARIANTS)
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
def test_gpu_split_bf16(mask, variant):
    with hstu_configs.override(backward_variant=variant):
        check_split(GPU_LENGTHS, mask=MASKS[mask], dtype=torch.bfloat16, device="cuda", threshold=256, dqk=64, dv=64)


@pytest.mark.gpu
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("dqk, dv", [(128, 128), (256, 256)])
def test_gpu_split_head_dims(dqk, dv, size):
    """The timed per-head-dim tables (the split backward at 256) with CP = 2 and 4."""
    check_split(GPU_LENGTHS, mask=MASKS["all"], dtype=torch.bfloat16, device="cuda", size=size, threshold=256,
                dqk=dqk, dv=dv)
