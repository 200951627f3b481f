"""The fused mHC pairs (Triton) against the compositions of the ops they replace, on random
inputs: a merge with the next pre op (``mhc_merge_pre``; streams, and the block input
standing for its copies), the first pre op on the block input (``mhc_expand_pre``), the
last merge with the contraction (``mhc_merge_contract``); forward outputs and every
gradient; n = 2, 4, 8; fp32 and bf16 streams; with the merge's keyed dropout on, the same
keys drop the same elements as the reference composition, and stream words read from a
device tensor (CUDA graphs) the same as the host's. Without a GPU the kernels run in the Triton
interpreter on tiny shapes; tests marked ``gpu`` run the compiled kernels at training sizes.

What is compared, every result against the float64 reference composition (relative error
over the whole tensor): the fused op must be as accurate as the separate Triton kernels on
the same inputs (within 1.5 times their error), or within a floor: 2e-5 for fp32 streams
(3e-4 for the n = 8 maps, as their own tests), 1e-4 for bf16 streams (the gate gradient:
see :data:`ALPHA`). With bf16 streams
both round the merged streams to bf16 where the separate merge writes them, so their
forward errors are that rounding's; the fused backward adds the gradients of the merged
streams in float32 (the separate ops add two bf16 gradients), so it is at least as
accurate. The forward is also compared with the separate kernels directly: the maps of the
next sublayer see the same rounded streams (1e-5), which the float64 comparison alone
would not resolve under bf16 rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.keyed_dropout import DropoutKeys, keep_mask  # noqa: E402
from megatron_gr.ops.mhc import mhc_expand_pre, mhc_merge_contract, mhc_merge_pre  # noqa: E402
from megatron_gr.ops.pytorch.keyed_dropout import stream_words  # noqa: E402
from tests.unit.ops.mhc_fused_parity import (  # noqa: E402
    assert_as_accurate,
    map_inputs,
    merge_inputs,
    merge_keys,
    relative,
    run_three_ways,
    separate_expand_pre,
    separate_merge_contract,
    separate_merge_pre,
)

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
MAP_OUTPUTS = ("out2", "out3")  # merge_pre's h_post and h_res of the next sublayer


def floor(dtype: torch.dtype, n: int) -> float:
    # n = 8: Sinkhorn over 8 streams amplifies the sums' order (seen on an H100 at 4099
    # tokens x 256 channels, bf16 streams: 1.9e-4 against the float64 reference)
    if n > 4:
        return 3e-4
    return 1e-4 if dtype == torch.bfloat16 else 2e-5


# The gate (alpha) gradient: 3 values, each a sum of T x W products of both signs that
# cancel, so its error is ill-conditioned and moves with the order of the sums (the
# separate ops' own tests give it 2e-3 with bf16 streams): its floor, not 1.5 times the
# separate kernels' error, which it can exceed by chance.
ALPHA = {torch.float32: 1e-4, torch.bfloat16: 2e-3}


def tolerances(dtype: torch.dtype, n: int) -> dict:
    return dict(floor=floor(dtype, n), floors={"d_alpha": ALPHA[dtype]})


def expand_pre(x, projection, alpha, map_bias, **kwargs):
    return mhc_expand_pre(x, projection, alpha, map_bias, **kwargs)


def check_forward_matches_separate(results, dtype, n):
    """Maps of the next sublayer within 1e-5 of the separate kernels' (the same rounded
    streams; 2e-4 for 8 streams); streams and u within a rounding of the streams' dtype."""
    for name, got, before, _ in results:
        if not name.startswith("out"):
            continue
        assert got.dtype == before.dtype, name
        # maps: fp32 sums of n x C products in another order, through 20 Sinkhorn iterations
        # (n = 8 with bf16 streams: 7.2e-5 on an H100)
        if name in MAP_OUTPUTS:
            bound = 1e-5 if n <= 4 else 2e-4
        else:
            bound = 1e-5 if dtype == torch.float32 else 1e-2
        assert relative(got, before) <= bound, f"{name}: {relative(got, before):.2e} from the separate kernels"


@DTYPES
@pytest.mark.parametrize("n, channels", [(2, 12), (4, 20), (8, 16)])
@pytest.mark.parametrize("expanded", [False, True], ids=["streams", "block_input"])
def test_merge_pre_matches_the_separate_ops(n, channels, expanded, dtype):
    """19 tokens: two 16-token tiles of the fused kernels, the second short."""
    leaves = {**merge_inputs(19, n, channels, dtype, DEVICE, seed=n + channels, expanded=expanded),
              **map_inputs(n, channels, DEVICE, seed=n)}
    results = run_three_ways(mhc_merge_pre, separate_merge_pre, leaves, dict(iterations=3, eps=1e-6))
    assert_as_accurate(results, **tolerances(dtype, n))
    check_forward_matches_separate(results, dtype, n)
    merged = results[0][1]
    assert merged.shape == (19, n, channels) and merged.dtype == dtype


@DTYPES
@pytest.mark.parametrize("n", [2, 4, 8])
def test_expand_pre_matches_the_separate_ops(n, dtype):
    g = torch.Generator().manual_seed(n)
    leaves = {"x": (torch.randn(19, 20, generator=g) * 2).to(DEVICE, dtype).requires_grad_(),
              **map_inputs(n, 20, DEVICE, seed=n + 1)}
    kwargs = dict(num_streams=n, iterations=3, eps=1e-6)
    results = run_three_ways(expand_pre, separate_expand_pre, leaves, kwargs)
    assert_as_accurate(results, **tolerances(dtype, n))


@DTYPES
@pytest.mark.parametrize("n, channels, with_bias", [(2, 12, True), (4, 20, False), (8, 16, True)])
@pytest.mark.parametrize("expanded", [False, True], ids=["streams", "block_input"])
def test_merge_contract_matches_the_separate_ops(n, channels, with_bias, expanded, dtype):
    """The fused mean skips the separate merge's rounding of the merged streams."""
    leaves = merge_inputs(9, n, channels, dtype, DEVICE, seed=3 * n, expanded=expanded, with_bias=with_bias)
    results = run_three_ways(mhc_merge_contract, separate_merge_contract, leaves, {})
    assert_as_accurate(results, **tolerances(dtype, n))


@pytest.mark.parametrize("n, channels, expanded, dtype", [
    (2, 12, True, torch.float32), (4, 20, False, torch.bfloat16), (8, 16, False, torch.float32),
    (4, 40, True, torch.bfloat16),
], ids=["n2-block_input-fp32", "n4-streams-bf16", "n8-streams-fp32", "n4-block_input-bf16"])
def test_merge_pairs_with_dropout_match_the_reference_composition(n, channels, expanded, dtype):
    """p = 0.3 with the same keys: both fused pairs drop the elements the reference merge
    drops (a different mask would move every result by order one), in the forward and again
    in the backward kernels; outputs and every gradient as accurate as the separate kernels."""
    tokens = 19
    keys, p = merge_keys(tokens, DEVICE), 0.3
    train = dict(dropout_p=p, training=True, dropout_keys=keys)
    leaves = {**merge_inputs(tokens, n, channels, dtype, DEVICE, seed=n + 40, expanded=expanded),
              **map_inputs(n, channels, DEVICE, seed=n + 41)}
    results = run_three_ways(mhc_merge_pre, separate_merge_pre, leaves, dict(iterations=3, eps=1e-6, **train))
    assert_as_accurate(results, **tolerances(dtype, n))
    check_forward_matches_separate(results, dtype, n)
    merge = {k: leaves[k] for k in ("x", "h_res", "h_post", "y", "bias")}
    assert_as_accurate(run_three_ways(mhc_merge_contract, separate_merge_contract, merge, train),
                       **tolerances(dtype, n))
    # The mask alone: zero streams, h_post = 1, y = 1, so every merged value is keep / (1 - p).
    alone = dict(x=torch.zeros_like(merge["x"]), h_res=merge["h_res"], h_post=torch.ones_like(merge["h_post"]),
                 y=torch.ones_like(merge["y"]), bias=None)
    want = keep_mask(keys, channels, p=p).cpu()
    merged = mhc_merge_pre(**alone, **{k: leaves[k] for k in ("projection", "alpha", "map_bias")}, iterations=3,
                           eps=1e-6, kernel="triton", **train)[0].detach()
    assert (merged == merged[:, :1]).all(), "one mask for all streams"
    assert torch.equal((merged[:, 0] != 0).cpu(), want)
    assert torch.equal((mhc_merge_contract(**alone, kernel="triton", **train) != 0).cpu(), want)


def pair_results(pair: str, leaves: dict, keys: DropoutKeys) -> list[torch.Tensor]:
    """Outputs and every gradient of ``merge_pre`` or ``merge_contract`` at p = 0.3."""
    train = dict(dropout_p=0.3, training=True, dropout_keys=keys, kernel="triton")
    if pair == "merge_pre":
        outs = mhc_merge_pre(**leaves, iterations=3, eps=1e-6, **train)
    else:
        outs = (mhc_merge_contract(**{k: leaves[k] for k in ("x", "h_res", "h_post", "y", "bias")}, **train),)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return [*outs, *torch.autograd.grad(outs, list(leaves.values()), grads, allow_unused=True)]


def check_device_words(pair: str, *, tokens: int, n: int, channels: int, expanded: bool, scale: float = 0.5):
    """Keys whose stream words come from a device tensor (``DropoutKeys.words``, what a
    replayed CUDA graph reads) drop exactly what the host words of the same seed drop, in
    every kernel of the pair; the words, not the keys' seed, decide."""
    leaves = {**merge_inputs(tokens, n, channels, torch.bfloat16, DEVICE, seed=8, expanded=expanded),
              **map_inputs(n, channels, DEVICE, seed=9, scale=scale)}
    host, other = merge_keys(tokens, DEVICE), dataclasses.replace(merge_keys(tokens, DEVICE), seed=99)

    def with_words_of(seed: int) -> DropoutKeys:
        words = torch.tensor(stream_words(seed, host.site), dtype=torch.int64, device=DEVICE)
        return dataclasses.replace(host, words=words)

    want_host, want_other = pair_results(pair, leaves, host), pair_results(pair, leaves, other)
    for got, want in ((pair_results(pair, leaves, with_words_of(host.seed)), want_host),
                      (pair_results(pair, leaves, with_words_of(other.seed)), want_other)):
        for index, (a, b) in enumerate(zip(got, want)):
            assert (a is None and b is None) or torch.equal(a, b), f"{pair}: result {index} differs"
    assert not torch.equal(want_host[0], want_other[0]), "two seeds, one mask: the test would prove nothing"


@pytest.mark.parametrize("pair", ["merge_pre", "merge_contract"])
@pytest.mark.parametrize("expanded", [False, True], ids=["streams", "block_input"])
def test_merge_pairs_read_the_stream_words_from_a_device_tensor(pair, expanded):
    check_device_words(pair, tokens=19, n=4, channels=20, expanded=expanded)


def test_merge_pairs_need_keys_for_dropout():
    leaves = {**merge_inputs(5, 4, 8, torch.float32, DEVICE, seed=1, expanded=False), **map_inputs(4, 8, DEVICE, seed=1)}
    with pytest.raises(ValueError, match="DropoutKeys"):
        mhc_merge_pre(**leaves, iterations=2, eps=1e-6, dropout_p=0.1, training=True, kernel="triton")
    merge = {k: leaves[k] for k in ("x", "h_res", "h_post", "y", "bias")}
    with pytest.raises(ValueError, match=r"token_keys must be a \[5\] int64"):
        mhc_merge_contract(**merge, dropout_p=0.1, training=True, kernel="triton",
                           dropout_keys=DropoutKeys(seed=1, site=2, token_keys=torch.zeros(4, dtype=torch.int64)))
    assert mhc_merge_contract(**merge, dropout_p=0.1, training=False).shape == (5, 8)  # no dropout: no keys needed


@pytest.mark.parametrize("used", ["u", "streams"])
def test_merge_pre_with_unused_outputs(used):
    """A caller that reads only some outputs: autograd passes None for the others."""
    n, channels = 4, 12
    leaves = {**merge_inputs(17, n, channels, torch.float32, DEVICE, seed=7, expanded=False),
              **map_inputs(n, channels, DEVICE, seed=8)}
    kwargs = dict(iterations=4, eps=1e-6)
    index = 1 if used == "u" else 0
    live = list(leaves.values())
    out = mhc_merge_pre(**leaves, kernel="triton", **kwargs)[index]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    got = torch.autograd.grad(out, live, grad, allow_unused=True)
    ref_leaves = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    ref = separate_merge_pre(**ref_leaves, kernel="pytorch", **kwargs)[index]
    want = torch.autograd.grad(ref, list(ref_leaves.values()), grad.double(), allow_unused=True)
    for name, a, b in zip(leaves, got, want):
        if b is None:  # the next maps do not reach the merged streams
            assert a is None or not a.any(), name
            continue
        assert relative(a, b) < 2e-5, f"{name}: {relative(a, b):.2e}"


def test_merge_pre_keeps_only_the_merge_inputs_and_small_maps():
    """Between forward and backward: the merge's inputs, the float32 map parameters and the
    pre op's small maps -- no [T, n, C] tensor but x (the merged streams are recomputed)."""
    n, channels, tokens = 4, 16, 8
    leaves = {**merge_inputs(tokens, n, channels, torch.bfloat16, DEVICE, seed=4, expanded=False),
              **map_inputs(n, channels, DEVICE, seed=4)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mhc_merge_pre(**leaves, iterations=20, eps=1e-6, kernel="triton")
    streams_sized = [t for t in saved if t.numel() >= tokens * n * channels]
    assert [tuple(t.shape) for t in streams_sized] == [(tokens, n, channels), (24, n * channels)]
    assert streams_sized[0].data_ptr() == leaves["x"].data_ptr()


def test_no_tokens():
    """A rank may hold no tokens: empty results, zero parameter gradients."""
    for expanded in (False, True):
        leaves = {**merge_inputs(0, 4, 8, torch.bfloat16, DEVICE, seed=1, expanded=expanded),
                  **map_inputs(4, 8, DEVICE, seed=1)}
        keys = DropoutKeys(seed=1, site=2, token_keys=torch.zeros(0, dtype=torch.int64, device=DEVICE))
        outs = mhc_merge_pre(**leaves, iterations=5, eps=1e-6, dropout_p=0.1, training=True, dropout_keys=keys,
                             kernel="triton")
        assert [tuple(o.shape) for o in outs] == [(0, 4, 8), (0, 8), (0, 4), (0, 4, 4)]
        grads = torch.autograd.grad([o.float().sum() for o in outs], list(leaves.values()))
        assert all(not g.any() for g in grads)
        merge = {k: leaves[k] for k in ("x", "h_res", "h_post", "y", "bias")}
        out = mhc_merge_contract(**merge, dropout_p=0.1, training=True, dropout_keys=keys, kernel="triton")
        assert out.shape == (0, 8) and not torch.autograd.grad(out.float().sum(), leaves["bias"])[0].any()
    maps = map_inputs(4, 8, DEVICE, seed=2)
    outs = expand_pre(torch.zeros(0, 8, device=DEVICE, requires_grad=True), **maps, num_streams=4, iterations=5,
                      eps=1e-6, kernel="triton")
    assert [tuple(o.shape) for o in outs] == [(0, 8), (0, 4), (0, 4, 4)]


def test_bad_shapes_are_one_line_errors():
    leaves = {**merge_inputs(5, 4, 8, torch.float32, DEVICE, seed=1, expanded=False), **map_inputs(4, 8, DEVICE, seed=1)}
    with pytest.raises(ValueError, match=r"h_post must be \[5, 4\], got \[5, 3\]"):
        mhc_merge_pre(**{**leaves, "h_post": torch.zeros(5, 3)}, iterations=2, eps=1e-6)
    with pytest.raises(ValueError, match=r"projection must be \[24, 32\] for 4 streams of 8 channels"):
        mhc_merge_pre(**{**leaves, "projection": torch.zeros(24, 8)}, iterations=2, eps=1e-6)
    with pytest.raises(ValueError, match=r"num_streams=0 must be a positive int"):
        expand_pre(leaves["y"], leaves["projection"], leaves["alpha"], leaves["map_bias"], num_streams=0,
                   iterations=2, eps=1e-6)
    with pytest.raises(ValueError, match=r"kernel='triton' \(mhc_merge_contract\).*float64"):
        merge = {k: leaves[k].double() for k in ("x", "h_res", "h_post", "y", "bias")}
        mhc_merge_contract(**merge, kernel="triton")


# ---------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@DTYPES
@pytest.mark.parametrize("n, channels", [(4, 1024), (2, 1000), (8, 256)])
@pytest.mark.parametrize("expanded", [False, True], ids=["streams", "block_input"])
def test_gpu_merge_pre_at_training_sizes(n, channels, expanded, dtype):
    """4099 tokens: many token tiles of every kernel, the last one short; 20 iterations."""
    leaves = {**merge_inputs(4099, n, channels, dtype, DEVICE, seed=20, expanded=expanded),
              **map_inputs(n, channels, DEVICE, seed=21, scale=0.05)}
    results = run_three_ways(mhc_merge_pre, separate_merge_pre, leaves, dict(iterations=20, eps=1e-6))
    assert_as_accurate(results, **tolerances(dtype, n))
    check_forward_matches_separate(results, dtype, n)


@pytest.mark.gpu
@DTYPES
def test_gpu_merge_pairs_with_dropout_at_training_sizes(dtype):
    """n = 4, 1024 channels, p = 0.1: the reference's keyed mask at many token tiles."""
    train = dict(dropout_p=0.1, training=True, dropout_keys=merge_keys(4099, DEVICE))
    leaves = {**merge_inputs(4099, 4, 1024, dtype, DEVICE, seed=25, expanded=False),
              **map_inputs(4, 1024, DEVICE, seed=26, scale=0.05)}
    results = run_three_ways(mhc_merge_pre, separate_merge_pre, leaves, dict(iterations=20, eps=1e-6, **train))
    assert_as_accurate(results, **tolerances(dtype, 4))
    check_forward_matches_separate(results, dtype, 4)
    merge = {k: leaves[k] for k in ("x", "h_res", "h_post", "y", "bias")}
    assert_as_accurate(run_three_ways(mhc_merge_contract, separate_merge_contract, merge, train),
                       **tolerances(dtype, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("pair", ["merge_pre", "merge_contract"])
def test_gpu_merge_pairs_read_the_stream_words_from_a_device_tensor(pair):
    check_device_words(pair, tokens=4099, n=4, channels=1024, expanded=False, scale=0.05)


@pytest.mark.gpu
@DTYPES
@pytest.mark.parametrize("n, channels", [(4, 1024), (8, 256)])
def test_gpu_expand_pre_and_merge_contract_at_training_sizes(n, channels, dtype):
    g = torch.Generator().manual_seed(22)
    leaves = {"x": torch.randn(4099, channels, generator=g).to(DEVICE, dtype).requires_grad_(),
              **map_inputs(n, channels, DEVICE, seed=23, scale=0.05)}
    results = run_three_ways(expand_pre, separate_expand_pre, leaves, dict(num_streams=n, iterations=20, eps=1e-6))
    assert_as_accurate(results, **tolerances(dtype, n))
    merge = merge_inputs(4099, n, channels, dtype, DEVICE, seed=24, expanded=False)
    assert_as_accurate(run_three_ways(mhc_merge_contract, separate_merge_contract, merge, {}), **tolerances(dtype, n))
