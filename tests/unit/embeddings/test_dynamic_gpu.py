"""The dynamic table on a GPU (Triton kernels) behaves as on the CPU (PyTorch references),
and the kernels compile for an H100 even on a machine without one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection
from megatron_gr.embeddings.dynamic.state import export_state
from tests.support.paths import REPO_ROOT


def _collection(device: str, kernel: str, **dynamic) -> DynamicEmbeddingCollection:
    settings = dict(capacity=1 << 11, bucket_size=64, optimizer="adam", lr=0.01, seed=2, eviction="lfu")
    settings.update(dynamic)
    config = EmbeddingTableConfig(dim=32, type="dynamic", init_std=0.05, dynamic=DynamicTableConfig(**settings))
    return DynamicEmbeddingCollection({"t": config}, default_seed=0, device=torch.device(device), backend=kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("admission_threshold", [1, 2])
def test_gpu_table_matches_cpu_table(admission_threshold):
    tables = {"cuda": _collection("cuda", "triton", admission_threshold=admission_threshold),
              "cpu": _collection("cpu", "pytorch", admission_threshold=admission_threshold)}
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        # Power-law ids over a large space, many repeats: about 2,000 distinct ids per step
        # and 6,000 over the run compete for 2,048 slots, so buckets evict (and refuse ids
        # when all their rows are this step's).
        ranks = (torch.rand(20_000, generator=generator).double() ** -2.5).clamp(max=2**40).long()
        ids = ranks * 2654435761 + 17
        weights = torch.randn(ids.numel(), 32, generator=generator)
        rows = {}
        for device, table in tables.items():
            out = table.lookup("t", ids.to(device))
            (out * weights.to(device)).sum().backward()
            table.tables["t"].apply_step(dense_lr=0.0)
            rows[device] = out.detach().cpu()
        torch.testing.assert_close(rows["cuda"], rows["cpu"], rtol=1e-5, atol=1e-6, msg=f"step {step}")
    cuda, cpu = (export_state(tables[d].tables["t"]) for d in ("cuda", "cpu"))
    for name in ("keys", "tags", "last_seen", "freq"):  # the same slots, in the same order
        assert torch.equal(cuda["rows"][name], cpu["rows"][name]), name
    # A hot id's gradient sums thousands of terms: both devices sum them in the one order of
    # ops.segment_sum (the test below holds them to the bit), so only Adam's own float32
    # operations, each correctly rounded on both, remain; 1e-5 would show any reordering
    # (1.7e-5 absolute when the embedding backward summed in its own order per device).
    torch.testing.assert_close(cuda["rows"]["weights"], cpu["rows"]["weights"], rtol=1e-5, atol=1e-6)
    for name in cpu["optimizer"]:
        torch.testing.assert_close(cuda["optimizer"][name], cpu["optimizer"][name], rtol=1e-5, atol=1e-6)
    assert tables["cuda"].tables["t"].statistics() == tables["cpu"].tables["t"].statistics()


@pytest.mark.gpu
@pytest.mark.parametrize("lookups_per_step", [1, 2])
def test_gpu_row_gradients_equal_cpu_bits(lookups_per_step):
    """Rows and per-row gradient sums of lookups with a hot id (15,000 of 60,000 ids, about
    60 windows of the segment sum) and an id near the window length: the same bits on both
    devices, for one lookup per step and for two (summed again at the step)."""
    generator = torch.Generator().manual_seed(3)
    lookups = []
    for size in (60_000, 9_000)[:lookups_per_step]:
        ids = torch.randint(0, 20_000, (size,), generator=generator) * 7919 - 3
        ids[torch.randperm(size, generator=generator)[: size // 4]] = 123_456_789
        ids[:300] = 55
        weights = torch.randn(size, 32, generator=generator) * torch.logspace(-3, 3, size)[:, None]
        lookups.append((ids, weights))
    seen = {}
    for device, kernel in (("cuda", "triton"), ("cpu", "pytorch")):
        collection = _collection(device, kernel, capacity=1 << 14)  # ~19,000 ids for 16,384 slots: some get none
        rows = []
        for ids, weights in lookups:
            out = collection.lookup("t", ids.to(device))
            (out * weights.to(device)).sum().backward()
            rows.append(out.detach().cpu())
        seen[device] = rows + [t.cpu() for t in collection.tables["t"]._gathered()]  # touched slots, gradient sums
    for a, b in zip(seen["cuda"], seen["cpu"]):
        assert torch.equal(a, b)


_COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from megatron_gr.ops.triton import dynamic_rows as R, hash_table as H, segment_sum as G, sparse_optimizers as S

    def compile(fn, signature, constants, warps=4):
        # The launcher's usual specialisation: 16-byte aligned tensors, dim a multiple of 16.
        aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
                   if kind.startswith("*") or name == "dim"}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert kernel.asm["cubin"], fn

    ptr = lambda t: "*" + t
    table = {n: ptr(t) for n, t in [("keys_ptr", "i64"), ("tags_ptr", "i32"), ("seen_ptr", "i64"), ("freq_ptr", "i64"),
             ("changed_ptr", "u8"), ("q_keys_ptr", "i64"), ("q_tags_ptr", "i32"), ("q_hashes_ptr", "i64"),
             ("q_counts_ptr", "i64"), ("q_insert_ptr", "u8"), ("slots_ptr", "i64"), ("status_ptr", "i8"),
             ("ev_keys_ptr", "i64"), ("ev_tags_ptr", "i32"), ("starts_ptr", "i64"), ("buckets_ptr", "i64"),
             ("runs_ptr", "i32"), ("valid_ptr", "i64")]}
    for policy, update, lanes, on_device in ((0, True, 64, False), (1, True, 64, True), (2, True, 64, False),
                                             (1, False, 64, True), (1, True, 256, False)):
        compile(H._probe_kernel, {**table, "num_queries": "i64", "num_buckets": "i64", "step": "i64", "BUCKET": "constexpr",
                "LANES": "constexpr", "BLOCK_Q": "constexpr", "POLICY": "constexpr", "UPDATE": "constexpr",
                "VALID_ON_DEVICE": "constexpr"},
                {"BUCKET": lanes, "LANES": lanes, "BLOCK_Q": H.PROBE_BLOCK, "POLICY": policy, "UPDATE": update,
                 "VALID_ON_DEVICE": on_device},
                warps=1 if lanes <= 64 else 2)
    for on_device in (False, True):  # the query count from the host, or read on the device (padded queries)
        compile(H._bucket_runs_kernel, {"q_hashes_ptr": "*i64", "starts_ptr": "*i64", "buckets_ptr": "*i64", "runs_ptr": "*i32",
                "valid_ptr": "*i64", "n": "i64", "num_buckets": "i64", "VALID_ON_DEVICE": "constexpr", "BLOCK": "constexpr"},
                {"VALID_ON_DEVICE": on_device, "BLOCK": H.RUNS_BLOCK})
    compile(H._routing_keys_kernel, {"ids_ptr": "*i64", "tags_ptr": "*i32", "out_ptr": "*i64", "n": "i64",
            "HAS_TAGS": "constexpr", "BLOCK": "constexpr"}, {"HAS_TAGS": False, "BLOCK": 1024})
    rows = {n: "*fp32" for n in ("weights_ptr", "state0_ptr", "state1_ptr")}
    ids = {"ids_ptr": "*i64", "tags_ptr": "*i32", "salts_ptr": "*i64", "scales_ptr": "*fp32"}
    for has_fresh in (True, False):
        compile(R._init_rows_kernel, {"weights_ptr": "*fp32", "fresh_ptr": "*u8", "slots_ptr": "*i64", "status_ptr": "*i8",
                **ids, "n": "i64", "dim": "i32", "HAS_FRESH": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                {"HAS_FRESH": has_fresh, "BLOCK_R": 32, "BLOCK_D": 128}, warps=8)
    for has_index in (True, False):
        compile(R._read_rows_kernel, {"weights_ptr": "*fp32", "slots_ptr": "*i64", "index_ptr": "*i64", **ids,
                "out_ptr": "*fp32", "n": "i64", "dim": "i32", "HAS_INDEX": "constexpr", "BLOCK_R": "constexpr",
                "BLOCK_D": "constexpr"}, {"HAS_INDEX": has_index, "BLOCK_R": 32, "BLOCK_D": 128}, warps=8)
    compile(G._gather_rows_kernel, {"rows_ptr": "*fp32", "index_ptr": "*i64", "out_ptr": "*fp32", "n": "i64", "dim": "i32",
            "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}, {"BLOCK_R": 32, "BLOCK_D": 128}, warps=8)
    sums = {"values_ptr": "*fp32", "order_ptr": "*i64", "seg_ptr": "*i64", "out_ptr": "*fp32", "first_ptr": "*fp32",
            "last_ptr": "*fp32", "n": "i64", "dim": "i32", "CHUNK_C": "constexpr", "BLOCK_D": "constexpr"}
    compile(G._window_sums_kernel, sums, {"CHUNK_C": 256, "BLOCK_D": 128}, warps=1)
    compile(G._join_pieces_kernel, {"seg_ptr": "*i64", "offsets_ptr": "*i64", "first_ptr": "*fp32", "last_ptr": "*fp32",
            "out_ptr": "*fp32", "n": "i64", "dim": "i32", "CHUNK_C": "constexpr", "BLOCK_D": "constexpr"},
            {"CHUNK_C": 256, "BLOCK_D": 128}, warps=1)
    for has_minor, take in ((False, 2), (True, 2), (False, 0)):
        compile(G._tile_starts_kernel, {"keys_ptr": "*i64", "minor_ptr": "*i32" if has_minor else "*i64", "counts_ptr": "*i32",
                "last_ptr": "*i64", "n": "i64", "HAS_MINOR": "constexpr", "TILE": "constexpr", "SUB": "constexpr"},
                {"HAS_MINOR": has_minor, "TILE": G.GROUP_SUB, "SUB": G.GROUP_SUB})
        compile(G._tile_groups_kernel, {"keys_ptr": "*i64", "minor_ptr": "*i32" if has_minor else "*i64", "order_ptr": "*i64",
                "tile_counts_ptr": "*i32", "tile_last_ptr": "*i64", "segments_ptr": "*i64", "inverse_ptr": "*i64",
                "offsets_ptr": "*i64", "first_ptr": "*i64", "unique_ptr": "*i64", "counts_ptr": "*i64", "take0_ptr": "*i64",
                "out0_ptr": "*i64", "take1_ptr": "*i32", "out1_ptr": "*i32", "n": "i64", "tiles": "i64",
                "HAS_MINOR": "constexpr", "TAKE": "constexpr", "TILE": "constexpr", "SUB": "constexpr", "TILES_BLOCK": "constexpr"},
                {"HAS_MINOR": has_minor, "TAKE": take, "TILE": 4 * G.GROUP_SUB, "SUB": G.GROUP_SUB, "TILES_BLOCK": G.TILES_BLOCK})
    scalars = {n: "fp32" for n in ("lr", "beta1", "beta2", "rest1", "rest2", "eps", "step_size", "bias2_sqrt", "init0", "init1")}
    for optimizer, has_fresh, has_skip in ((0, False, False), (1, True, True), (2, True, False), (3, True, True),
                                           (3, False, False)):
        compile(S._sparse_update_kernel, {**rows, "slots_ptr": "*i64", "grads_ptr": "*fp32", "fresh_ptr": "*u8",
                "scale_ptr": "*fp32", "skip_ptr": "*fp32", "n": "i64", "dim": "i32", **scalars, "OPTIMIZER": "constexpr",
                "HAS_FRESH": "constexpr", "HAS_SKIP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                {"OPTIMIZER": optimizer, "HAS_FRESH": has_fresh, "HAS_SKIP": has_skip, "BLOCK_R": 32, "BLOCK_D": 128}, warps=8)
    print("compiled")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_compile_to_h100_machine_code():
    """Compiles every kernel variant for sm_90 (Triton's own LLVM and ptxas, no GPU needed):
    the interpreter tests check what the kernels compute, this that they build."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
