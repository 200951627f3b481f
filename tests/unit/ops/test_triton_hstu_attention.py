"""The Triton HSTU attention against the PyTorch reference (float64) on random inputs: every
mask alone and combined, relative bias, lengths 0, 1 and long, head dims, dtypes, every
backward variant (fused dk/dv, split dv + dk, atomic dq); forward output and every gradient.

Without a GPU the kernels run in the Triton interpreter (needs triton; small shapes and
blocks of 16 so that short sequences cross block boundaries); tests marked ``gpu`` run the
compiled kernels on CUDA at larger shapes.

Tolerances: relative error ``|a - b| / |b|`` over the whole tensor against the float64
reference: fp32 1e-5, fp16 5e-3, bf16 2e-2 (16-bit operands of the matrix products, fp32
accumulation; the GPU's tanh-based SiLU adds about 1e-3); three times that for the 16-bit
relative-bias weight gradients (sums of many terms of both signs).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.hstu_attention import hstu_attention  # noqa: E402
from megatron_gr.ops.relative_bias import RelativeBiasInputs  # noqa: E402
from megatron_gr.ops.triton import hstu_configs  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

MASKS = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "window": dict(max_attn_len=5),
    "contextual": dict(contextual_len=3),
    "targets": dict(targets=True),
    "sla": dict(max_attn_len=4, global_prefix_len=6),
    "all": dict(max_attn_len=4, global_prefix_len=6, contextual_len=2, targets=True),
    "bidirectional_all": dict(causal=False, max_attn_len=4, global_prefix_len=6, contextual_len=2, targets=True),
}


def make_inputs(lengths, *, heads, dqk, dv, dtype, device, bias, time_fn="sqrt", seed=0, sparse_times=False):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(total, heads, dqk), rand(total, heads, dqk), rand(total, heads, dv)
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64, device=device)
    rel = None
    if bias:
        # Small gaps hit every bucket boundary; a few huge jumps land in the last bucket.
        gaps = torch.randint(0, 40, (total,), generator=g) + (torch.rand(total, generator=g) < 0.05) * 10**9
        if sparse_times:  # every gap past the last sqrt bucket (7^2): uniform tiles off the diagonal
            gaps = gaps + 50
        starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1])
        ts = torch.cumsum(gaps, 0)
        rel = RelativeBiasInputs(
            position_weights=torch.randn(9, generator=g, dtype=torch.float32).to(device).requires_grad_(),
            time_weights=torch.randn(7, generator=g, dtype=torch.float32).to(device).requires_grad_(),
            timestamps=(ts - ts[starts].repeat_interleave(torch.tensor(lengths))).to(device),
            time_bucket_fn=time_fn,
        )
    return q, k, v, offsets, rel


def check_parity(lengths, *, mask, dtype, device, heads=2, dqk=16, dv=16, bias=False, time_fn="sqrt",
                 normalizer="max_seq_len", seed=0, sparse_times=False):
    q, k, v, offsets, rel = make_inputs(
        lengths, heads=heads, dqk=dqk, dv=dv, dtype=dtype, device=device, bias=bias, time_fn=time_fn, seed=seed,
        sparse_times=sparse_times,
    )
    mask = dict(mask)
    targets = None
    if mask.pop("targets", False):
        targets = torch.tensor([min(3, n // 2) for n in lengths], device=device)
    kwargs = dict(max_seq_len=max(lengths) + 3, alpha=0.7, normalizer=normalizer, num_targets=targets,
                  relative_bias=rel, **mask)
    leaves = [q, k, v] + ([rel.position_weights, rel.time_weights] if rel is not None else [])
    out = hstu_attention(q, k, v, offsets, kernel="triton", **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_bias = None
    if rel is not None:
        ref_bias = RelativeBiasInputs(ref_leaves[3], ref_leaves[4], rel.timestamps, rel.time_bucket_fn)
    ref = hstu_attention(*ref_leaves[:3], offsets, kernel="pytorch", **{**kwargs, "relative_bias": ref_bias})
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())

    assert out.dtype == dtype and out.shape == ref.shape
    names = ["out", "dq", "dk", "dv", "d_position_weights", "d_time_weights"]
    for name, got, want in zip(names, [out, *grads], [ref, *ref_grads]):
        assert torch.isfinite(got).all(), name
        error = ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()
        # A bias-weight gradient sums ~10^6 pair gradients of both signs: the result is much
        # smaller than its terms, so 16-bit rounding of the terms weighs more.
        tolerance = TOLERANCE[dtype] * (3 if name.startswith("d_") and name.endswith("weights") and dtype != torch.float32 else 1)
        assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run where there is no GPU")


@cpu_only
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
def test_interpreter_masks_fp32(mask):
    check_parity([1, 20, 37, 5, 0, 50], mask=MASKS[mask], dtype=torch.float32, device="cpu")


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", ["causal", "all"])
def test_interpreter_half_precision(mask, dtype):
    check_parity([1, 33, 18], mask=MASKS[mask], dtype=dtype, device="cpu", bias=True)


@cpu_only
@pytest.mark.parametrize("time_fn", ["sqrt", "log"])
@pytest.mark.parametrize("mask", ["causal", "all", "bidirectional_all"])
def test_interpreter_relative_bias(mask, time_fn):
    check_parity([1, 40, 23], mask=MASKS[mask], dtype=torch.float32, device="cpu", bias=True, time_fn=time_fn)


@cpu_only
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform_tiles", "per_pair"])
@pytest.mark.parametrize("time_fn, sparse", [("sqrt", True), ("log", True), ("sqrt", False)])
@pytest.mark.parametrize("mask", ["causal", "bidirectional_all"])
def test_interpreter_relative_bias_uniform_tiles(mask, time_fn, sparse, uniform):
    """Sequences of up to 70 tokens against 9 position buckets: most 16 x 16 tiles lie past
    the last position bucket; with gaps of 50 s and more (``sparse``) off-diagonal tiles are
    past the last time bucket too. The uniform-tile path (one weight, one gradient sum per
    such tile) and the per-pair path both match the reference."""
    with hstu_configs.override(uniform_bias_tiles=uniform):
        check_parity([70, 3, 45, 17], mask=MASKS[mask], dtype=torch.float32, device="cpu", bias=True,
                     time_fn=time_fn, sparse_times=sparse)


def test_uniform_bias_tiles_only_where_tiles_pass_the_last_position_bucket():
    cfg = hstu_configs.KernelConfig(128, 32)
    assert not hstu_configs.uniform_bias_tiles(200, 256, cfg)  # ML-100K: no tile that far
    assert hstu_configs.uniform_bias_tiles(4096, 256, cfg)
    with hstu_configs.override(uniform_bias_tiles=True):
        assert hstu_configs.uniform_bias_tiles(10, 256, cfg)
    with hstu_configs.override(uniform_bias_tiles=False):
        assert not hstu_configs.uniform_bias_tiles(4096, 256, cfg)


def test_interpreter_hstu_log_time_buckets():
    check_parity([1, 40, 23], mask=MASKS["all"], dtype=torch.float32, device="cpu", bias=True, time_fn="hstu_log")


def test_query_time_bias_is_refused_with_one_line():
    q, k, v, offsets, rel = make_inputs([3], heads=1, dqk=4, dv=4, dtype=torch.float32, device=DEVICE, bias=True)
    rel.query_timestamps = rel.timestamps + 1
    with pytest.raises(ValueError, match="need the PyTorch reference"):
        hstu_attention(q, k, v, offsets, max_seq_len=4, alpha=1.0, relative_bias=rel, kernel="triton")


@cpu_only
def test_interpreter_odd_head_dims_and_seq_len_normaliser():
    check_parity([2, 29, 1], mask=MASKS["targets"], dtype=torch.float32, device="cpu", dqk=24, dv=12,
                 normalizer="seq_len", bias=True)


@cpu_only
@pytest.mark.parametrize("mask", ["causal", "all", "bidirectional_all"])
def test_interpreter_atomic_dq_and_uneven_blocks(mask):
    """The five-product backward (dq by atomics) and blocks of different heights."""
    forward = hstu_configs.KernelConfig(32, 16, num_warps=1, num_stages=1)
    backward = hstu_configs.KernelConfig(16, 32, num_warps=1, num_stages=1, atomic_dq=True)
    with hstu_configs.override(forward=forward, backward=backward):
        check_parity([1, 45, 70], mask=MASKS[mask], dtype=torch.float32, device="cpu", bias=True)


@cpu_only
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
def test_interpreter_split_backward(mask):
    """dv, dk and dq in three kernels, each with its own blocks (heights differ from the
    forward's and from each other; one launch with a register cap), relative bias on: every
    mask."""
    backward = hstu_configs.KernelConfig(
        16, 32, num_warps=1, num_stages=1, split_dkdv=True,
        dk=hstu_configs.KernelConfig(32, 16, num_warps=1, num_stages=1, maxnreg=128),
        dq=hstu_configs.KernelConfig(32, 16, num_warps=1, num_stages=1),
    )
    with hstu_configs.override(backward=backward):
        check_parity([1, 45, 70, 0, 17], mask=MASKS[mask], dtype=torch.float32, device="cpu", bias=True)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreter_split_backward_variant_knob(dtype):
    """The ``split`` variant chosen by name (as the benchmark and the lead's switch do), 16-bit."""
    with hstu_configs.override(backward_variant="split"):
        assert hstu_configs.backward_config(16, 16, dtype).split_dkdv
        check_parity([1, 33, 18], mask=MASKS["all"], dtype=dtype, device="cpu", bias=True)


@pytest.mark.parametrize(
    "dqk, dv, dtype, split",
    [(256, 256, torch.bfloat16, True), (256, 200, torch.float16, True), (128, 128, torch.bfloat16, False),
     (64, 64, torch.bfloat16, False), (256, 256, torch.float32, False)],
)
def test_auto_backward_variant(dqk, dv, dtype, split, monkeypatch):
    """``auto`` (the default) splits 16-bit backwards at head dim 256, where it was timed faster."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the compiled tables, not the interpreter's blocks
    with hstu_configs.override(backward_variant="auto"):
        assert hstu_configs.backward_config(dqk, dv, dtype).split_dkdv == split


def test_relative_bias_takes_blocks_that_fit(monkeypatch):
    """At head dim 256 the split dk launch with the bias drops to two stages (three need 228
    KiB of shared memory with the bias tables, over the H100's 227 KiB); without it, three."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plain = hstu_configs.backward_config(256, 256, torch.bfloat16)
    with_bias = hstu_configs.backward_config(256, 256, torch.bfloat16, has_bias=True)
    assert (plain.dk.num_stages, with_bias.dk.num_stages) == (3, 2)
    assert with_bias.dq == plain.dq and with_bias.block_n == plain.block_n


def test_backward_variant_knob_rejects_unknown_names():
    with pytest.raises(ValueError, match="backward_variant must be 'auto' or one of"):
        with hstu_configs.override(backward_variant="fast"):
            pass


def test_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, offsets, _ = make_inputs([3], heads=1, dqk=4, dv=4, dtype=torch.float32, device="cpu", bias=False)
    with pytest.raises(RuntimeError, match="CUDA devices only"):
        hstu_attention(q, k, v, offsets, max_seq_len=4, alpha=1.0, kernel="triton")


# ---------------------------------------------------------------- GPU (compiled kernels)

GPU_LENGTHS = [1, 300, 1031, 64, 0, 517]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", hstu_configs.BACKWARD_VARIANTS)
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
def test_gpu_masks_bf16(mask, variant):
    with hstu_configs.override(backward_variant=variant):
        check_parity(GPU_LENGTHS, mask=MASKS[mask], dtype=torch.bfloat16, device="cuda", heads=2, dqk=64, dv=64,
                     bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", hstu_configs.BACKWARD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("mask", ["causal", "all"])
def test_gpu_dtypes(mask, dtype, variant):
    with hstu_configs.override(backward_variant=variant):
        check_parity(GPU_LENGTHS, mask=MASKS[mask], dtype=dtype, device="cuda", heads=2, dqk=64, dv=64, bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", hstu_configs.BACKWARD_VARIANTS)
@pytest.mark.parametrize("dqk, dv", [(32, 32), (128, 128), (256, 256), (40, 24)])
def test_gpu_head_dims(dqk, dv, variant):
    """Each variant's per-head-dim blocks (the 128 and 256 tables are the ones timed)."""
    with hstu_configs.override(backward_variant=variant):
        check_parity(GPU_LENGTHS, mask=MASKS["all"], dtype=torch.bfloat16, device="cuda", heads=2, dqk=dqk, dv=dv,
                     bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("time_fn", ["sqrt", "log", "hstu_log"])
def test_gpu_relative_bias_seq_len_normaliser(time_fn):
    check_parity(GPU_LENGTHS, mask=MASKS["causal"], dtype=torch.bfloat16, device="cuda", dqk=128, dv=128,
                 bias=True, time_fn=time_fn, normalizer="seq_len")


@pytest.mark.gpu
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform_tiles", "per_pair"])
def test_gpu_relative_bias_uniform_tiles(uniform):
    """The e2e shape's head dims (4 x 256, the split backward) with sequences long enough for
    tiles past the last of 9 position buckets and sparse timestamps, both bias paths (the log
    time buckets: the interpreter tests)."""
    with hstu_configs.override(uniform_bias_tiles=uniform):
        check_parity([700, 33, 1, 450], mask=MASKS["causal"], dtype=torch.bfloat16, device="cuda", heads=4,
                     dqk=256, dv=256, bias=True, sparse_times=True)


@pytest.mark.gpu
def test_gpu_register_capped_configs():
    """Configs capped at 128 registers (two 8-warp programs per SM; the dq kernel spills a
    little), as the benchmark's sweep tries them, on every mask rule and the bias."""
    capped = hstu_configs.KernelConfig(32, 128, num_warps=8, num_stages=3, maxnreg=128)
    backward = hstu_configs.KernelConfig(
        32, 128, num_warps=8, num_stages=3, maxnreg=128, split_dkdv=True, dk=capped,
        dq=hstu_configs.KernelConfig(128, 32, num_warps=8, num_stages=3, maxnreg=128),
    )
    forward = hstu_configs.KernelConfig(128, 32, num_warps=8, num_stages=3, maxnreg=128)
    with hstu_configs.override(forward=forward, backward=backward):
        check_parity(GPU_LENGTHS, mask=MASKS["all"], dtype=torch.bfloat16, device="cuda", dqk=128, dv=128, bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("atomic_dq", [True, False])
def test_gpu_backward_variants(atomic_dq):
    base = hstu_configs.backward_config(64, 64, torch.bfloat16)
    cfg = hstu_configs.KernelConfig(64, 64, num_warps=4, num_stages=2, atomic_dq=atomic_dq)
    with hstu_configs.override(backward=cfg):
        check_parity(GPU_LENGTHS, mask=MASKS["all"], dtype=torch.bfloat16, device="cuda", dqk=64, dv=64, bias=True)
    assert hstu_configs.backward_config(64, 64, torch.bfloat16) == base
