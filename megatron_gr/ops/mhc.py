"""Manifold-constrained hyper-connections (mHC): validates inputs once, then dispatches.

Shapes use T tokens, n residual streams and C channels (the hidden size). The streams of a
token are the rows of ``x`` ``[T, n, C]``; between layers megatron carries them as
``[T, 1, n C]``, the same memory. The math is written out in
:mod:`megatron_gr.ops.pytorch.mhc`.

A kernel implementing these functions takes the same arguments and returns the same
shapes and dtypes:

=================  ===========================================  ============================
function           inputs                                       returns
=================  ===========================================  ============================
mhc_mappings       x [T, n, C] float; projection [n²+2n, n C],  h_pre [T, n], h_post [T, n],
                   alpha [3], bias [n²+2n] float32/64           h_res [T, n, n] (compute dtype)
sinkhorn           logits [T, n, n]                             [T, n, n] (compute dtype)
mhc_aggregate      x [T, n, C]; h_pre [T, n]                    [T, C] (x.dtype)
mhc_pre            as mhc_mappings                              u [T, C] (x.dtype) = aggregate
                                                                with h_pre; h_post, h_res
mhc_merge          x [T, n, C]; h_res [T, n, n]; h_post [T, n]; [T, n, C] (x.dtype)
                   y [T, C]; bias [C] or None
input_expand       x [T, C]                                     [T, n, C] (x.dtype)
output_contract    x [T, n, C]                                  [T, C] (x.dtype)
mhc_merge_pre      the merge's, then the next pre op's maps     merged [T, n, C] (x.dtype),
                   (x [T, n, C] or the block input [T, C])      then as mhc_pre
mhc_expand_pre     x [T, C], num_streams; maps as mhc_pre       as mhc_pre
mhc_merge_contract as mhc_merge (x may be [T, C])               [T, C] (x.dtype)
=================  ===========================================  ============================

"compute dtype" is float32, or float64 when any input is float64.

``kernel='triton'`` runs the fused Triton kernels of :mod:`megatron_gr.ops.triton` (mhc_*)
on CUDA (on the CPU only in Triton's interpreter, for tests). They compute in float32 and
take float32, bfloat16 or float16 tensors (float64 checks need the reference).
``mhc_pre`` is ``mhc_mappings`` then ``mhc_aggregate`` with the same numbers; its Triton
kernels are the two ops' forward kernels in one autograd function and a fused backward that
writes one dx (the hyper-connection layers use it; h_pre has no other reader). Dropout in
``mhc_merge`` is keyed (:mod:`megatron_gr.ops.keyed_dropout`): both kernels draw the same
mask from the token keys, and so do the fused pairs below (every layout, and a recompute
replay, drops the same elements). ``input_expand`` and ``output_contract`` are one copy and
one mean, a single pass in PyTorch already: both kernels run the same code for them.

The last three fuse ops that run back to back in a hyper-connection block (the design and
the bytes they save: ``docs/design/mhc.md``). Their references are the compositions of the
ops above (:mod:`megatron_gr.ops.pytorch.mhc_fused`); the Triton kernels move each token's
streams fewer times: the merge with the next sublayer's pre op, the expansion inside the
first pre op, the contraction inside the last merge.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.keyed_dropout import DropoutKeys, check_dropout_keys
from megatron_gr.ops.pytorch.mhc_fused import (
    pytorch_mhc_expand_pre,
    pytorch_mhc_merge_contract,
    pytorch_mhc_merge_pre,
)
from megatron_gr.ops.pytorch.mhc import (
    pytorch_input_expand,
    pytorch_mhc_aggregate,
    pytorch_mhc_mappings,
    pytorch_mhc_merge,
    pytorch_mhc_pre,
    pytorch_output_contract,
    pytorch_sinkhorn,
)

_MAPPING_DTYPES = (torch.float32, torch.float64)


def mhc_mappings(
    x: torch.Tensor,
    projection: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    iterations: int,
    eps: float,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three mixing maps of every token from its streams.

    Args:
        x: ``[T, n, C]`` residual streams (any float dtype; read as float32 at least).
        projection: ``[n² + 2n, n C]`` rows for H_pre (n), H_post (n), H_res (n², row-major
            ``[i, j]``), applied to the flattened streams (``F.linear`` layout).
        alpha: ``[3]`` gates of the pre, post and res logits.
        bias: ``[n² + 2n]`` static logits, same order as ``projection``'s rows.
        iterations: Sinkhorn-Knopp iterations (each one row and one column normalisation).
        eps: added to the mean square before the RMS of the token's ``n C`` values.

    Returns:
        ``h_pre`` ``[T, n]`` in (0, 1), ``h_post`` ``[T, n]`` in (0, 2) and ``h_res``
        ``[T, n, n]`` doubly stochastic, all in the compute dtype.
    """
    _check_mapping_args(x, projection, alpha, bias, iterations, eps, kernel)
    if kernel == "triton":
        _require_triton("mhc_mappings", x, projection, alpha, bias)
        from megatron_gr.ops.triton.mhc_mappings import triton_mhc_mappings

        return triton_mhc_mappings(x, projection, alpha, bias, iterations=iterations, eps=eps)
    return pytorch_mhc_mappings(x, projection, alpha, bias, iterations=iterations, eps=eps)


def mhc_pre(
    x: torch.Tensor,
    projection: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    iterations: int,
    eps: float,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hyper-connection steps before a sublayer: :func:`mhc_mappings` of the streams,
    then :func:`mhc_aggregate` with their ``h_pre``, which no one else reads. Arguments as
    :func:`mhc_mappings`.

    Returns:
        ``u`` ``[T, C]`` in ``x.dtype`` (the sublayer input before its norm), ``h_post``
        ``[T, n]`` and ``h_res`` ``[T, n, n]`` in the compute dtype.
    """
    _check_mapping_args(x, projection, alpha, bias, iterations, eps, kernel)
    if kernel == "triton":
        _require_triton("mhc_pre", x, projection, alpha, bias)
        from megatron_gr.ops.triton.mhc_pre import triton_mhc_pre

        return triton_mhc_pre(x, projection, alpha, bias, iterations=iterations, eps=eps)
    return pytorch_mhc_pre(x, projection, alpha, bias, iterations=iterations, eps=eps)


def sinkhorn(logits: torch.Tensor, iterations: int, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` ``[T, n, n]``: ``iterations`` times a
    row normalisation then a column normalisation, so columns sum to 1 exactly and rows to
    1 up to the convergence left after ``iterations``. Finite for any finite logits (the
    first round runs in log space). The backward stores only ``logits`` and replays the
    iterations."""
    kernel = check_backend(kernel)
    if logits.dim() != 3 or logits.shape[1] != logits.shape[2] or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [T, n, n] tensor, got {logits.dtype} {list(logits.shape)}")
    _check_iterations(iterations)
    if kernel == "triton":
        _require_triton("sinkhorn", logits)
        from megatron_gr.ops.triton.mhc_sinkhorn import triton_sinkhorn

        return triton_sinkhorn(logits, iterations)
    return pytorch_sinkhorn(logits, iterations)


def mhc_aggregate(x: torch.Tensor, h_pre: torch.Tensor, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """The sublayer input ``sum_i h_pre[:, i] x[:, i]`` ``[T, C]`` in ``x.dtype``."""
    kernel = check_backend(kernel)
    _check_streams("x", x)
    _check_shape("h_pre", h_pre, x.shape[:2])
    if kernel == "triton":
        _require_triton("mhc_aggregate", x, h_pre)
        from megatron_gr.ops.triton.mhc_aggregate import triton_mhc_aggregate

        return triton_mhc_aggregate(x, h_pre)
    return pytorch_mhc_aggregate(x, h_pre)


def mhc_merge(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_keys: Optional[DropoutKeys] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> torch.Tensor:
    """The streams after a sublayer, ``[T, n, C]`` in ``x.dtype``:
    ``h_res @ x + h_post ⊗ dropout(y + bias)`` (bias-dropout-add with one dropout mask for
    all streams).

    Args:
        x: ``[T, n, C]`` streams that entered the sublayer.
        h_res: ``[T, n, n]``, ``h_res[t, i, j]`` = share of stream j in new stream i.
        h_post: ``[T, n]`` weight of the sublayer output in each new stream.
        y: ``[T, C]`` sublayer output; ``bias`` ``[C]`` its bias when not yet added.
        dropout_p, training: dropout of ``y + bias`` (off unless ``training``).
        dropout_keys: keys of the dropout mask, one per token, features = the C channels;
            needed when dropout is active.
    """
    kernel = check_backend(kernel)
    _check_streams("x", x)
    _check_merge_args(x, h_res, h_post, y, bias, dropout_p, training, dropout_keys)
    if kernel == "triton":
        _require_triton("mhc_merge", x, h_res, h_post, y, *([] if bias is None else [bias]))
        from megatron_gr.ops.triton.mhc_merge import triton_mhc_merge

        return triton_mhc_merge(
            x, h_res, h_post, y, bias, dropout_p=dropout_p, training=training, dropout_keys=dropout_keys
        )
    return pytorch_mhc_merge(
        x, h_res, h_post, y, bias, dropout_p=dropout_p, training=training, dropout_keys=dropout_keys
    )


def input_expand(x: torch.Tensor, n: int, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """``[T, C]`` -> ``[T, n, C]``: every stream starts as a copy of the block input."""
    kernel = check_backend(kernel)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, C], got {list(x.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    return pytorch_input_expand(x, n)


def output_contract(x: torch.Tensor, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """``[T, n, C]`` -> ``[T, C]``: the mean of the streams. Column-stochastic H_res keeps
    the sum of the streams, so with H_post = 1 the mean follows ``mean + F(...)`` like a
    plain residual stream."""
    kernel = check_backend(kernel)
    _check_streams("x", x)
    return pytorch_output_contract(x)


def mhc_merge_pre(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    projection: torch.Tensor,
    alpha: torch.Tensor,
    map_bias: torch.Tensor,
    *,
    iterations: int,
    eps: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_keys: Optional[DropoutKeys] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sublayer's merge and the next sublayer's pre op in one: :func:`mhc_merge` of
    ``(x, h_res, h_post, y, bias)``, then :func:`mhc_pre` of the merged streams with the
    next sublayer's maps ``(projection, alpha, map_bias)``.

    Args:
        x: ``[T, n, C]`` streams that entered the sublayer, or ``[T, C]``: the block input
            standing for its n copies (:func:`input_expand` folded in; n from ``h_res``).
        h_res, h_post, y, bias, dropout_p, training, dropout_keys: the merge's, as
            :func:`mhc_merge` (the same keyed mask).
        projection, alpha, map_bias, iterations, eps: the next pre op's, as :func:`mhc_pre`.

    Returns:
        The merged streams ``[T, n, C]`` (x's dtype) and the pre op's ``u`` ``[T, C]``,
        ``h_post`` ``[T, n]`` and ``h_res`` ``[T, n, n]``.
    """
    kernel = check_backend(kernel)
    _, n, channels = _check_merge_args(x, h_res, h_post, y, bias, dropout_p, training, dropout_keys)
    _check_maps((n, channels), projection, alpha, map_bias, iterations, eps)
    if kernel == "triton":
        _require_triton("mhc_merge_pre", x, h_res, h_post, y, projection, alpha, map_bias,
                        *([] if bias is None else [bias]))
        from megatron_gr.ops.triton.mhc_merge_pre import triton_mhc_merge_pre

        return triton_mhc_merge_pre(x, h_res, h_post, y, bias, projection, alpha, map_bias, iterations=iterations,
                                    eps=eps, dropout_p=dropout_p, training=training, dropout_keys=dropout_keys)
    return pytorch_mhc_merge_pre(x, h_res, h_post, y, bias, projection, alpha, map_bias, iterations=iterations,
                                 eps=eps, dropout_p=dropout_p, training=training, dropout_keys=dropout_keys)


def mhc_expand_pre(
    x: torch.Tensor,
    projection: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    num_streams: int,
    iterations: int,
    eps: float,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first sublayer's pre op on the block input ``x`` ``[T, C]``: :func:`mhc_pre` of
    :func:`input_expand` ``(x, num_streams)`` (the copies never reach memory in Triton).
    Arguments and results as :func:`mhc_pre`."""
    kernel = check_backend(kernel)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [T, C] tensor, got {x.dtype} {list(x.shape)}")
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
        raise ValueError(f"num_streams={num_streams!r} must be a positive int")
    _check_maps((num_streams, x.shape[1]), projection, alpha, bias, iterations, eps)
    if kernel == "triton":
        _require_triton("mhc_expand_pre", x, projection, alpha, bias)
        from megatron_gr.ops.triton.mhc_pre import triton_mhc_expand_pre

        return triton_mhc_expand_pre(x, projection, alpha, bias, num_streams=num_streams, iterations=iterations,
                                     eps=eps)
    return pytorch_mhc_expand_pre(x, projection, alpha, bias, num_streams=num_streams, iterations=iterations, eps=eps)


def mhc_merge_contract(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_keys: Optional[DropoutKeys] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> torch.Tensor:
    """The block's last merge and the contraction in one: :func:`output_contract` of
    :func:`mhc_merge`, ``[T, C]`` in x's dtype. Arguments as :func:`mhc_merge_pre`'s merge
    (x may be the block input ``[T, C]``, a block of one sublayer)."""
    kernel = check_backend(kernel)
    _check_merge_args(x, h_res, h_post, y, bias, dropout_p, training, dropout_keys)
    if kernel == "triton":
        _require_triton("mhc_merge_contract", x, h_res, h_post, y, *([] if bias is None else [bias]))
        from megatron_gr.ops.triton.mhc_merge_pre import triton_mhc_merge_contract

        return triton_mhc_merge_contract(x, h_res, h_post, y, bias, dropout_p=dropout_p, training=training,
                                         dropout_keys=dropout_keys)
    return pytorch_mhc_merge_contract(x, h_res, h_post, y, bias, dropout_p=dropout_p, training=training,
                                      dropout_keys=dropout_keys)


def _check_merge_args(x, h_res, h_post, y, bias, dropout_p, training, dropout_keys) -> tuple[int, int, int]:
    """Checks a merge's inputs, x ``[T, n, C]`` or the block input ``[T, C]``; returns the
    merged streams' shape ``(T, n, C)``."""
    if x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"x must be a float [T, n, C] or [T, C] tensor, got {x.dtype} {list(x.shape)}")
    if h_res.dim() != 3 or h_res.shape[1] != h_res.shape[2]:
        raise ValueError(f"h_res must be [T, n, n], got {list(h_res.shape)}")
    num_tokens, n, channels = x.shape[0], h_res.shape[1], x.shape[-1]
    if x.dim() == 3:
        _check_shape("x", x, (num_tokens, n, channels))
    _check_shape("h_res", h_res, (num_tokens, n, n))
    _check_shape("h_post", h_post, (num_tokens, n))
    _check_shape("y", y, (num_tokens, channels))
    if bias is not None:
        _check_shape("bias", bias, (channels,))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    if training and dropout_p > 0.0:
        check_dropout_keys(dropout_keys, num_tokens=num_tokens, device=x.device)
    return num_tokens, n, channels


def _check_mapping_args(x, projection, alpha, bias, iterations, eps, kernel) -> None:
    check_backend(kernel)
    _check_streams("x", x)
    _check_maps(x.shape[1:], projection, alpha, bias, iterations, eps)


def _check_maps(streams_shape, projection, alpha, bias, iterations, eps) -> None:
    """The map parameters of streams ``[n, C]`` (``streams_shape``, per token)."""
    n, channels = streams_shape
    width = n * n + 2 * n
    for name, tensor, shape in (
        ("projection", projection, (width, n * channels)),
        ("alpha", alpha, (3,)),
        ("bias", bias, (width,)),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for {n} streams of {channels} channels, "
                             f"got {list(tensor.shape)}")
        if tensor.dtype not in _MAPPING_DTYPES:
            raise ValueError(
                f"{name} is {tensor.dtype}: mHC mapping parameters must stay float32 (or float64); "
                "a half-precision cast of the model must leave them out"
            )
    _check_iterations(iterations)
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0")


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require_triton(op: str, *tensors: torch.Tensor) -> None:
    """The fused kernels run here (CUDA, or the interpreter) and take these dtypes."""
    require_backend(KernelBackend.TRITON, tensors[0].device, what=op)
    for tensor in tensors:
        if tensor.dtype not in _TRITON_DTYPES:
            raise ValueError(
                f"kernel='triton' ({op}) computes in float32 and takes float32, bfloat16 or float16 "
                f"tensors, got {tensor.dtype}: use kernel='pytorch'"
            )


def _check_streams(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float [T, n, C] tensor, got {x.dtype} {list(x.shape)}")


def _check_shape(name: str, tensor: torch.Tensor, shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)}, got {list(tensor.shape)}")


def _check_iterations(iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be an int >= 1")
