"""Hash-table ops of the dynamic embeddings, dispatched to the PyTorch reference or the
Triton kernels (one place chooses; a missing backend is an error).

- :func:`routing_keys`: ids (+ logical-table tags) -> 64-bit routing keys
  (:mod:`megatron_gr.ops.pytorch.id_hash` explains the bits).
- :func:`probe`: find-or-insert distinct queries in a bucketed table with scores
  (:mod:`megatron_gr.ops.pytorch.hash_probe` states the exact semantics).
- :func:`init_rows`: the probe's new rows get their initial value; their optimizer state
  is flagged fresh (written by the first update, which then reads none).
- :func:`read_rows`: the rows of probed queries (stored or initial), optionally gathered.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.pytorch.dynamic_rows import pytorch_init_rows, pytorch_read_rows
from megatron_gr.ops.pytorch.hash_probe import PADDING, POLICIES, ProbeResult, pytorch_probe
from megatron_gr.ops.pytorch.id_hash import routing_keys as pytorch_routing_keys

def _triton(device: torch.device, what: str):
    """The Triton kernel modules (imported only once Triton can run here)."""
    require_backend(KernelBackend.TRITON, device, what=what)
    from megatron_gr.ops import triton as kernels
    from megatron_gr.ops.triton import dynamic_rows, hash_table  # noqa: F401  (loads them into `kernels`)

    return kernels


def routing_keys(ids: torch.Tensor, tags: Optional[torch.Tensor] = None, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """Routing key of every id ``[N]`` int64; ``tags`` ``[N]`` int32 or None (all 0)."""
    kernel = check_backend(kernel)
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if kernel == "triton":
        return _triton(ids.device, "routing keys").hash_table.triton_routing_keys(ids.contiguous(), None if tags is None else tags.contiguous())
    return pytorch_routing_keys(ids, tags)


def probe(
    keys: torch.Tensor,
    tags: torch.Tensor,
    last_seen: torch.Tensor,
    freq: torch.Tensor,
    changed: torch.Tensor,
    query_keys: torch.Tensor,
    query_tags: torch.Tensor,
    query_hashes: torch.Tensor,
    query_counts: torch.Tensor,
    may_insert: torch.Tensor,
    *,
    num_buckets: int,
    bucket_size: int,
    step: int,
    policy: str,
    update_scores: bool,
    valid: Optional[torch.Tensor] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> ProbeResult:
    """Find-or-insert distinct (id, tag) queries sorted by routing key ``query_hashes``.

    Table: ``keys`` int64, ``tags`` int32, ``last_seen`` int64 (-1 = empty), ``freq`` int64,
    ``changed`` uint8, each ``[num_buckets * bucket_size]``, updated in place. Queries:
    ``[U]`` keys int64, tags int32, hashes int64, counts int64 (occurrences), may_insert bool.
    ``valid`` (a device scalar, with padded dedupe outputs): only the first ``valid``
    queries are probed; the others get slot -1 and status ``PADDING``, and no host read
    happens on the Triton path.
    """
    kernel = check_backend(kernel)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose one of {tuple(POLICIES)}")
    capacity = num_buckets * bucket_size
    for name, tensor, dtype in (
        ("keys", keys, torch.int64), ("tags", tags, torch.int32), ("last_seen", last_seen, torch.int64),
        ("freq", freq, torch.int64), ("changed", changed, torch.uint8),
    ):
        if tensor.dtype != dtype or tensor.shape != (capacity,):
            raise ValueError(f"table {name} must be {dtype} [{capacity}], got {tensor.dtype} {tuple(tensor.shape)}")
    count = query_keys.numel()
    for name, tensor, dtype in (
        ("query_keys", query_keys, torch.int64), ("query_tags", query_tags, torch.int32),
        ("query_hashes", query_hashes, torch.int64), ("query_counts", query_counts, torch.int64),
        ("may_insert", may_insert, torch.bool),
    ):
        if tensor.dtype != dtype or tensor.shape != (count,):
            raise ValueError(f"{name} must be {dtype} [{count}], got {tensor.dtype} {tuple(tensor.shape)}")
    args = (keys, tags, last_seen, freq, changed, query_keys, query_tags, query_hashes, query_counts, may_insert)
    options = dict(num_buckets=num_buckets, bucket_size=bucket_size, step=step, policy=policy, update_scores=update_scores)
    if kernel == "triton":
        return _triton(keys.device, "hash probe").hash_table.triton_probe(*args, **options, valid=valid)
    if valid is None:
        return pytorch_probe(*args, **options)
    probed = int(valid)  # the reference reads it (it reads the device in other places too)
    result = pytorch_probe(*args[:5], *(t[:probed] for t in args[5:]), **options)
    padded = ProbeResult(
        torch.full((count,), -1, dtype=torch.int64, device=query_keys.device),
        torch.full((count,), PADDING, dtype=torch.int8, device=query_keys.device),
        torch.zeros(count, dtype=torch.int64, device=query_keys.device),
        torch.zeros(count, dtype=torch.int32, device=query_keys.device),
    )
    for field in ("slots", "status", "evicted_keys", "evicted_tags"):  # astuple would deep-copy them
        getattr(padded, field)[:probed] = getattr(result, field)
    return padded


def init_rows(
    weights: torch.Tensor,
    fresh: Optional[torch.Tensor],
    slots: torch.Tensor,
    status: torch.Tensor,
    ids: torch.Tensor,
    tags: torch.Tensor,
    salts: torch.Tensor,
    scales: torch.Tensor,
    *,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> None:
    """Slots the probe just filled (status INSERTED or REPLACED) get their initial value and
    their ``fresh`` flag (optimizer state initial until the first update).
    See :func:`megatron_gr.ops.pytorch.dynamic_rows.pytorch_init_rows`."""
    kernel = check_backend(kernel)
    _check_weights(weights)
    if fresh is not None and (fresh.dtype != torch.uint8 or fresh.shape != (weights.shape[0],)):
        raise ValueError(f"fresh must be uint8 [{weights.shape[0]}], got {fresh.dtype} {tuple(fresh.shape)}")
    args = (weights, fresh, slots, status, ids, tags, salts, scales)
    if kernel == "triton":
        return _triton(weights.device, "row initialisation").dynamic_rows.triton_init_rows(*args)
    return pytorch_init_rows(*args)


def read_rows(
    weights: torch.Tensor,
    slots: torch.Tensor,
    ids: torch.Tensor,
    tags: torch.Tensor,
    salts: torch.Tensor,
    scales: torch.Tensor,
    *,
    index: Optional[torch.Tensor] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> torch.Tensor:
    """Rows ``[U, D]`` of ``U`` probed queries (stored row, or initial value where the slot
    is -1), or with ``index`` ``[N]`` int64 the rows ``[N, D]`` of queries ``index`` (one
    pass, no ``[U, D]`` intermediate). Run :func:`init_rows` first.
    See :func:`megatron_gr.ops.pytorch.dynamic_rows.pytorch_read_rows`."""
    kernel = check_backend(kernel)
    _check_weights(weights)
    if index is not None and index.dtype != torch.int64:
        raise ValueError(f"index must be int64, got {index.dtype}")
    args = (weights, slots, ids, tags, salts, scales, index)
    if kernel == "triton":
        return _triton(weights.device, "row read").dynamic_rows.triton_read_rows(*args)
    return pytorch_read_rows(*args)


def _check_weights(weights: torch.Tensor) -> None:
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        raise ValueError(f"weights must be contiguous float32, got {weights.dtype}")
