"""compat.fast_optimizer: for-each norm and scale against megatron's local helpers, the
patches restored, the main shards' reused gradient views (and the norm's list of them, and
zero_grad) equal to megatron's, clipping by one for-each multiply equal to megatron's, and
a training run with the fast step (fused Adam, batched copies, the per-token division on the
device) equal to one with megatron's own (CPU, fp32)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from megatron.core import utils as megatron_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer

from megatron_gr.compat import fast_optimizer_ops
from megatron_gr.compat.fast_optimizer import foreach_l2_norm, foreach_scale, local_tensor
from tests.unit.training.helpers import tiny_config


def _tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in ((3, 4), (7,), (1,), (5, 2, 2))]


def test_foreach_norm_matches_megatrons_local_norm():
    tensors = _tensors(0)
    norm, _ = foreach_l2_norm(0, None, [tensors], False)
    expected = torch.cat([t.double().flatten() for t in tensors]).norm()
    assert norm.shape == (1,) and norm.dtype == torch.float32
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)


def test_foreach_scale_in_place_copy_and_scaled_copy():
    grads = _tensors(1)
    expected = [g * 0.5 for g in grads]
    foreach_scale(0, None, [grads, grads], 0.5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    sources, targets = _tensors(2), [torch.zeros_like(t, dtype=torch.float64) for t in _tensors(2)]
    foreach_scale(0, None, [sources, targets], 1.0)
    for source, target in zip(sources, targets):
        torch.testing.assert_close(target, source.double(), rtol=0, atol=0)
    foreach_scale(0, None, [sources, targets], 3.0)
    for source, target in zip(sources, targets):
        torch.testing.assert_close(target, (source * 3.0).double(), rtol=0, atol=0)


def test_local_tensor_unwraps_as_megatron_does():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    plain = torch.randn(3, requires_grad=True)
    assert local_tensor(plain) is plain and megatron_utils.to_local_if_dtensor(plain) is plain
    dist = torch.distributed
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        shard = torch.randn(4, requires_grad=True)
        wrapped = DTensor.from_local(shard, mesh, [Replicate()])
        got, want = local_tensor(wrapped), megatron_utils.to_local_if_dtensor(wrapped)
        assert not isinstance(got, DTensor) and torch.equal(got, want) and torch.equal(got, shard)
    finally:
        if own_group:
            dist.destroy_process_group()


def test_patches_apply_to_the_local_fallbacks_and_are_restored():
    with fast_optimizer_ops():
        with fast_optimizer_ops():  # nested: free
            assert clip_grads.l2_norm_impl is foreach_l2_norm
        assert clip_grads.multi_tensor_scale_impl is foreach_scale
        assert megatron_optimizer.multi_tensor_scale_impl is foreach_scale
        assert clip_grads.to_local_if_dtensor is local_tensor
    assert clip_grads.to_local_if_dtensor is megatron_utils.to_local_if_dtensor
    assert clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale
    assert megatron_optimizer.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale


def _train(tmp_path, steps: int):
    from megatron_gr.training.model_setup import unwrap
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, training={"clip_grad": 0.05}))  # small: clipping acts
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    weights = {k: v.detach().clone() for k, v in unwrap(trainer.model[0]).state_dict().items() if torch.is_tensor(v)}
    inner = [part.optimizer for part in trainer.optimizer.chained_optimizers]
    shutdown()
    return losses, weights, inner


def test_fast_step_trains_as_megatrons_step(tmp_path, monkeypatch):
    from megatron_gr.training import model_setup, optimizer_setup, runtime

    runtime.shutdown()
    fast_losses, fast_weights, fast_inner = _train(tmp_path / "fast", 4)
    assert all(group["fused"] for opt in fast_inner for group in opt.param_groups)

    monkeypatch.setattr(runtime, "fast_optimizer_ops", contextlib.nullcontext)
    monkeypatch.setattr(optimizer_setup, "use_fused_adam", lambda optimizer: 0)
    monkeypatch.setattr(optimizer_setup, "batch_main_to_model_copies", lambda optimizer: 0)
    monkeypatch.setattr(optimizer_setup, "reuse_main_grad_views", lambda optimizer: 0)
    monkeypatch.setattr(model_setup, "per_token_finalize", lambda finalize, tables: finalize)
    old_losses, old_weights, old_inner = _train(tmp_path / "old", 4)
    assert not any(group["fused"] for opt in old_inner for group in opt.param_groups)

    assert fast_losses == pytest.approx(old_losses, rel=1e-5)
    for name, weight in old_weights.items():
        torch.testing.assert_close(fast_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_reused_main_grad_views_are_megatrons_hand_over(tmp_path):
    """After a step, the shim and megatron's own method give every main shard a gradient
    with the same values in the same memory (a view of DDP's gradient buffer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_gr.compat.optimizer_step import _parts
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()
    trainer.train_step()  # the views made in the first step serve the second
    parts = [p for p in _parts(trainer.optimizer) if isinstance(p, DistributedOptimizer)]
    assert parts and all("_copy_model_grads_to_main_grads" in vars(part) for part in parts)
    for part in parts:
        mains = [p for group in part.shard_fp32_from_float16_groups + part.shard_fp32_groups for p in group]
        part._copy_model_grads_to_main_grads()
        ours = [(p.grad.data_ptr(), p.grad.clone()) for p in mains]
        DistributedOptimizer._copy_model_grads_to_main_grads(part)
        theirs = [(p.grad.data_ptr(), p.grad.clone()) for p in mains]
        assert [ptr for ptr, _ in ours] == [ptr for ptr, _ in theirs]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))
        assert any(b.abs().sum() > 0 for _, b in theirs)  # real gradients, not zeros
        # The norm's gradients: megatron's filter of them, the same tensors in its order.
        part._copy_model_grads_to_main_grads()
        listed = part.get_main_grads_for_grad_norm()
        filtered = DistributedOptimizer.get_main_grads_for_grad_norm(part)
        assert len(listed) == len(filtered) > 0 and all(a is b for a, b in zip(listed, filtered))
        # zero_grad leaves every gradient None, as megatron's does.
        part.zero_grad()
        groups = (part.model_float16_groups + part.model_fp32_groups + part.shard_float16_groups
                  + part.shard_fp32_groups + part.shard_fp32_from_float16_groups)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reading a view's .grad warns
            assert all(p.grad is None for group in groups for p in group)
    trainer.loader.close()
    shutdown()


def test_fast_clipping_scales_as_megatrons(tmp_path):
    """Clipping by the for-each multiply (compat.optimizer_step) leaves the main gradients
    exactly as megatron's own clipping does."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megatron_gr.compat.optimizer_step import _parts, clip_grads_and_step, prepare_grads_and_norm
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()  # leaves its gradients in the main shards
    optimizer = trainer.optimizer
    _, norm = prepare_grads_and_norm(optimizer)
    params = [p for part in _parts(optimizer) for p in part.get_parameters()]
    before = [p.grad.clone() for p in params]
    total = 4.0 * norm  # a factor of 1/4: clipping applies
    expected = [g.clone() for g in before]
    with fast_optimizer_ops():
        stand_ins = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
        for stand_in, grad in zip(stand_ins, expected):
            stand_in.grad = grad
        clip_grad_by_total_norm_fp32(stand_ins, optimizer.config.clip_grad, total)
        step = type(optimizer).step_with_ready_grads
        try:
            type(optimizer).step_with_ready_grads = lambda self: True  # clip only
            clip_grads_and_step(optimizer, total_norm=total)
        finally:
            type(optimizer).step_with_ready_grads = step
    assert any(not torch.equal(p.grad, b) for p, b in zip(params, before))
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    trainer.loader.close()
    shutdown()


def test_each_optimizer_part_keeps_its_own_views(monkeypatch):
    """A chained optimizer (e.g. dense and expert parameters) has several distributed parts:
    each part's shims use the views of that part, whichever part calls first."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_gr.compat import fast_optimizer

    parts = [DistributedOptimizer.__new__(DistributedOptimizer) for _ in range(2)]
    for part in parts:
        part.ddp_config = SimpleNamespace(grad_reduce_in_fp32=True)
    grads = [torch.full((3,), float(i + 1)) for i in range(2)]
    mains = [torch.zeros(3, requires_grad=True) for _ in range(2)]
    models = [torch.zeros(3) for _ in range(2)]
    monkeypatch.setattr(fast_optimizer, "_plain_distributed_copy", lambda part: True)
    monkeypatch.setattr(fast_optimizer, "_main_grad_views", lambda part: [(mains[parts.index(part)], grads[parts.index(part)])])
    monkeypatch.setattr(fast_optimizer, "_main_to_model_views",
                        lambda part: [([models[parts.index(part)]], [grads[parts.index(part)]])])
    chained = SimpleNamespace(chained_optimizers=parts)
    assert fast_optimizer.reuse_main_grad_views(chained) == 2
    assert fast_optimizer.batch_main_to_model_copies(chained) == 2
    for index in (1, 0):  # the second part first: a shared cache would hand part 0 part 1's views
        parts[index]._copy_model_grads_to_main_grads()
        parts[index]._copy_main_params_to_model_params()
    for index in range(2):
        assert torch.equal(mains[index].grad, grads[index]) and torch.equal(models[index], grads[index])


def test_main_to_model_views_group_by_dtypes_and_cover_every_weight():
    """bf16 weights beside float32 ones (mHC's maps): one for-each copy per dtype pair, since a
    copy whose lists mix dtypes runs one kernel per tensor; every weight's slice is written."""
    from types import SimpleNamespace

    from megatron_gr.compat import fast_optimizer

    buffers = [torch.zeros(7, dtype=torch.bfloat16), torch.zeros(4)]
    params = [torch.empty(3), torch.empty(4), torch.empty(4)]  # stand-ins: identity is what counts
    mains = [torch.arange(3.0) + 1, torch.arange(4.0) + 10, torch.arange(4.0) + 20]
    placed = {0: (0, 0, 3), 1: (0, 3, 7), 2: (1, 0, 4)}  # param -> (buffer, start, end)
    index = {id(p): i for i, p in enumerate(params)}
    part = SimpleNamespace(
        shard_fp32_from_float16_groups=[mains[:2]], model_float16_groups=[params[:2]],
        shard_fp32_groups=[mains[2:]], model_fp32_groups=[params[2:]],
        _get_model_param_range_map=lambda p: {"gbuf_world_in_bucket": SimpleNamespace(
            start=placed[index[id(p)]][1], end=placed[index[id(p)]][2])},
        model_param_gbuf_map={p: (placed[i][0], None, 0) for i, p in enumerate(params)},
        buffers=[SimpleNamespace(buckets=[SimpleNamespace(param_data=b)]) for b in buffers],
    )
    groups = fast_optimizer._main_to_model_views(part)
    assert len(groups) == 2
    for targets, sources in groups:
        assert len({t.dtype for t in targets}) == 1 and len({s.dtype for s in sources}) == 1
        torch._foreach_copy_(targets, sources)
    assert torch.equal(buffers[0], torch.cat(mains[:2]).bfloat16()) and torch.equal(buffers[1], mains[2])


def test_grad_norm_on_one_rank_is_megatrons(tmp_path):
    """The norm without megatron's all-reduce over a group of one rank is megatron's norm,
    the same float; the optimizer's norm goes through it."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    from megatron_gr.compat import fast_optimizer
    from megatron_gr.compat.optimizer_step import _parts
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()
    part = _parts(trainer.optimizer)[0]
    grads, group = part.get_main_grads_for_grad_norm(), part.get_grad_stats_parallel_group()
    with fast_optimizer_ops():
        assert megatron_optimizer.get_grad_norm_fp32 is not get_grad_norm_fp32  # patched
        ours = fast_optimizer.grad_norm_skipping_alone(get_grad_norm_fp32)(grads, grad_stats_parallel_group=group)
        theirs = get_grad_norm_fp32(grads, grad_stats_parallel_group=group)
        assert ours == theirs > 0 and part.get_grad_norm() == theirs
    trainer.loader.close()
    shutdown()
