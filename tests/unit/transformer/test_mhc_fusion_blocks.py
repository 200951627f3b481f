"""Blocks that fuse their hyper-connection ops (``fuse_merges``) against the same blocks
running them one by one, on the PyTorch references, whose fused ops are the compositions
of the separate ones: the same outputs and gradients (float64, to 1e-9: only the order of
autograd's sums differs; dropout on: every merge draws the keyed mask of its tokens) for STU and
transformer layers, with mHC recompute blocks and
across two pipeline stages, where the merge at each boundary runs alone. Fast: these check
the layer and block wiring; the Triton kernels are checked in tests/unit/ops and
test_mhc_fused.py."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_gr.transformer.mhc_pending import PendingMerge
from tests.unit.transformer.helpers import block_inputs, build, config, run, run_two_stages

FLOAT64 = dict(params_dtype=torch.float64)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert relative(a[name], b[name]) < 1e-9, f"{name}: {relative(a[name], b[name]):.1e}"


def flat(result) -> dict:
    out, dx, grads, _, _ = result
    return {"out": out, "dx": dx, **grads}


@pytest.mark.parametrize("pairs", [False, True], ids=["merge_then_pre", "merge_pre_pairs"])
@pytest.mark.parametrize("kind", ["stu", "transformer"])
@pytest.mark.parametrize("recompute_layers", [None, 1, 3], ids=["no_recompute", "recompute_1", "recompute_3"])
def test_fused_block_matches_the_separate_block(megatron_cpu, kind, recompute_layers, pairs):
    overrides = dict(FLOAT64, recompute=recompute_layers is not None, recompute_layers=recompute_layers,
                     mhc_fuse_merge_pre=pairs)
    separate = build(kind, config(kind, **overrides), fuse_merges=False)
    fused = build(kind, config(kind, **overrides), fuse_merges=True)
    fused.load_state_dict(separate.state_dict())
    assert fused.fuse_merges and not separate.fuse_merges
    x, kwargs = block_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    assert_same(flat(run(fused, x.double(), kwargs, rng_states)), flat(run(separate, x.double(), kwargs, rng_states)))


@pytest.mark.parametrize("kind", ["stu", "transformer"])
@pytest.mark.parametrize("recompute_layers", [None, 2], ids=["no_recompute", "recompute"])
def test_fused_pipeline_stages_match_the_separate_stages(megatron_cpu, kind, recompute_layers):
    """Two stages of 2 layers: the first stage's last merge runs alone before it sends the
    merged streams; the last stage starts from them."""
    stages = {}
    for fuse in (False, True):
        cfg = config(kind, **FLOAT64, num_layers=2, recompute=recompute_layers is not None,
                     recompute_layers=recompute_layers)
        stages[fuse] = (build(kind, cfg, post_process=False, fuse_merges=fuse),
                        build(kind, cfg, pre_process=False, fuse_merges=fuse))
    for plain, fused in zip(stages[False], stages[True]):
        fused.load_state_dict(plain.state_dict())
    x, kwargs = block_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    sent_a, out_a, dx_a, grads_a = run_two_stages(*stages[False], x.double(), kwargs, rng_states)
    sent_b, out_b, dx_b, grads_b = run_two_stages(*stages[True], x.double(), kwargs, rng_states)
    assert sent_b.shape == (*x.shape[:2], 4 * x.shape[2])
    assert_same({"sent": sent_b, "out": out_b, "dx": dx_b, **grads_b}, {"sent": sent_a, "out": out_a, "dx": dx_a,
                                                                        **grads_a})


def test_layers_leave_their_last_merge_pending_for_a_fusing_block(megatron_cpu):
    """Asked by the block (``mhc_defer_merge``), a layer returns its pending merge; called
    alone, the merged streams."""
    block = build("transformer", config("transformer", **FLOAT64, recompute=False, num_layers=1), fuse_merges=True)
    layer = block.layers[0]
    x, kwargs = block_inputs("transformer")
    streams = x.double().repeat(1, 1, 4)
    pending, _ = layer(streams, mhc_defer_merge=True, **kwargs)
    merged, _ = layer(streams, **kwargs)
    assert isinstance(pending, PendingMerge) and pending.connection is layer.mlp_hyper_connection
    assert merged.shape == streams.shape


def test_full_layer_recompute_runs_the_merges_alone(megatron_cpu):
    """megatron's checkpoint passes tensors between layers: the block fuses nothing there."""
    overrides = dict(FLOAT64, recompute=False, recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=2)
    separate = build("stu", config("stu", **overrides), fuse_merges=False)
    fused = build("stu", config("stu", **overrides), fuse_merges=True)
    fused.load_state_dict(separate.state_dict())
    x, kwargs = block_inputs("stu")
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    assert_same(flat(run(fused, x.double(), kwargs, rng_states)), flat(run(separate, x.double(), kwargs, rng_states)))


def test_blocks_fuse_by_default_only_on_the_triton_backend(megatron_cpu):
    cfg = config("stu", recompute=False, num_layers=1)
    assert not build("stu", cfg, backend="pytorch").fuse_merges
    pytest.importorskip("triton")
    assert build("stu", cfg, backend="triton").fuse_merges


@pytest.mark.parametrize("pairs", [False, True])
def test_merge_pre_pairs_run_only_when_asked(megatron_cpu, monkeypatch, pairs):
    """``mhc_fuse_merge_pre``: each of the 3 merges between 4 sublayers runs inside the next
    pre op; off, each runs alone (``merge``) and the fused block's other ops stay fused."""
    from megatron_gr.transformer.hyper_connection import HyperConnectionModule

    calls = {"merge_pre": 0, "merge": 0, "expand_pre": 0, "merge_contract": 0}
    for name in calls:
        original = getattr(HyperConnectionModule, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(HyperConnectionModule, name, counted)
    block = build("stu", config("stu", **FLOAT64, recompute=False, mhc_fuse_merge_pre=pairs), fuse_merges=True)
    x, kwargs = block_inputs("stu")
    block(x.double(), **kwargs)
    assert calls == {"merge_pre": 3 if pairs else 0, "merge": 0 if pairs else 3, "expand_pre": 1, "merge_contract": 1}
