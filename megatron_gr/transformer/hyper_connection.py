"""``HyperConnectionModule``: the learned mHC maps around one sublayer (arXiv 2512.24880).

Between layers the n residual streams of each token travel as one tensor
``[s, b, n * C]`` (stream i in channels ``[i C, (i + 1) C)``), so megatron's blocks,
checkpoints and pipeline stages carry them like a wider hidden state. Around a sublayer F::

    u, h_post, h_res = module.pre(streams)           # mappings, then aggregate with h_pre
    y                = F(u)                                             # [s, b, C]
    streams          = module.merge(streams, h_res, h_post, y)          # [s, b, n C]

Ops that run back to back fuse (the Triton kernels then move the streams fewer times):
``next_module.merge_pre`` is a merge and the next sublayer's pre, ``expand_pre`` the first
sublayer's pre on the block input (no n copies made), ``merge_contract`` the last merge
and the mean of the streams.

The math is in :mod:`megatron_gr.ops.mhc`. Its parameters stay float32 under any model
dtype (see ``_apply``); they are replicated over tensor-parallel ranks and marked
``sequence_parallel`` so that, when tokens are split, ``finalize_model_grads`` sums their
gradients over the tensor-parallel group.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core import utils as megatron_utils  # make_viewless_tensor: looked up at call time (compat.export)

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.backend import KernelBackend, check_backend
from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.ops.mhc import (
    input_expand,
    mhc_expand_pre,
    mhc_mappings,
    mhc_merge,
    mhc_merge_contract,
    mhc_merge_pre,
    mhc_pre,
    output_contract,
)

# Initial H_res diagonal: each stream keeps most of itself (the identity start of
# hyper-connections) while Sinkhorn still converges to float32 precision in 20 iterations
# (0.9 leaves row sums off by 2e-5, 0.98 by 4e-4).
_INITIAL_SELF_SHARE = 0.8


def initial_bias(n: int) -> torch.Tensor:
    """Static logits ``[n² + 2n]`` (pre | post | res) that start every sublayer as a plain
    residual one when the streams are equal copies: H_pre = 1/n (the sublayer reads the
    mean stream), H_post = 1 (every stream receives the whole output), and H_res symmetric
    with ``_INITIAL_SELF_SHARE`` on the diagonal (its rows sum to 1 before any iteration)."""
    pre = torch.full((n,), -math.log(n - 1))  # sigmoid = 1 / n
    post = torch.zeros(n)  # 2 sigmoid(0) = 1
    off_diagonal = -math.log((n - 1) * _INITIAL_SELF_SHARE / (1 - _INITIAL_SELF_SHARE))
    res = (1 - torch.eye(n)) * off_diagonal
    return torch.cat([pre, post, res.reshape(-1)])


class HyperConnectionModule(MegatronModule):
    """Projection ``[n² + 2n, n C]``, gates ``alpha`` ``[3]`` and static logits ``bias``
    ``[n² + 2n]`` of one sublayer's hyper-connection."""

    def __init__(self, config: GRTransformerConfig, *, backend: KernelBackend = KernelBackend.PYTORCH):
        """``backend``: the implementation of the mHC ops (resolved by the run plan, given
        by the spec); Triton runs them as fused kernels, the maps' math stays float32."""
        super().__init__(config)
        n, width = config.num_residual_streams, config.hidden_size
        self.num_streams = n
        self.kernel = check_backend(backend)
        dtype = torch.promote_types(config.params_dtype, torch.float32)  # float32, or float64 for checks
        self.projection = torch.nn.Parameter(torch.empty(n * n + 2 * n, n * width, dtype=dtype))
        self.alpha = torch.nn.Parameter(torch.full((3,), float(config.mhc_init_gating_factor), dtype=dtype))
        self.bias = torch.nn.Parameter(initial_bias(n).to(dtype))
        with torch.no_grad():
            torch.nn.init.normal_(self.projection, std=config.init_method_std)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def _apply(self, fn, recurse=True):
        """Keeps the parameters float32 when the model is cast to half precision
        (megatron's ``Float16Module`` calls ``module.bfloat16()``): the mHC maps are
        computed in float32, and Sinkhorn on bf16 logits would not be doubly stochastic
        to better than 1e-2. Other casts (float64 for gradient checks) and moves apply."""

        def at_least_float32(tensor):
            out = fn(tensor)
            return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

        return super()._apply(at_least_float32, recurse)

    def mappings(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``streams`` ``[s, b, n C]`` -> ``h_pre`` ``[s b, n]``, ``h_post`` ``[s b, n]``,
        ``h_res`` ``[s b, n, n]`` (float32)."""
        return self._with_maps(mhc_mappings, streams)

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``streams`` ``[s, b, n C]`` -> the sublayer input ``[s, b, C]`` (before its norm,
        in the streams' dtype), ``h_post`` ``[s b, n]`` and ``h_res`` ``[s b, n, n]``
        (float32): :meth:`mappings` and the aggregate with their ``h_pre`` in one op."""
        s, b, _ = streams.shape
        u, h_post, h_res = self._with_maps(mhc_pre, streams)
        return u.view(s, b, -1), h_post, h_res

    def expand_pre(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`pre` of the n streams the block input ``hidden`` ``[s, b, C]`` expands to,
        without making them (the first sublayer of a block)."""
        s, b, width = hidden.shape
        u, h_post, h_res = mhc_expand_pre(
            hidden.reshape(s * b, width), self.projection, self.alpha, self.bias, num_streams=self.num_streams,
            iterations=self.config.mhc_sinkhorn_iterations, eps=self.config.layernorm_epsilon, kernel=self.kernel,
        )
        return u.view(s, b, -1), h_post, h_res

    def merge_pre(
        self,
        streams: torch.Tensor,
        h_res: torch.Tensor,
        h_post: torch.Tensor,
        output: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        dropout_p: float,
        dropout_keys: Optional[DropoutKeys] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The previous sublayer's :meth:`merge` (its maps ``h_res``, ``h_post``, its
        ``output``, ``bias`` and ``dropout_keys``) and this sublayer's :meth:`pre` in one op.
        ``streams`` ``[s, b, n C]``, or the block input ``[s, b, C]`` standing for its n
        copies. Returns the merged streams ``[s, b, n C]`` and :meth:`pre`'s results."""
        s, b, _ = output.shape
        merged, u, h_post_next, h_res_next = mhc_merge_pre(
            self._merge_input(streams), h_res, h_post, output.reshape(s * b, -1), bias, self.projection, self.alpha,
            self.bias, iterations=self.config.mhc_sinkhorn_iterations, eps=self.config.layernorm_epsilon,
            dropout_p=dropout_p, training=self.training, dropout_keys=dropout_keys, kernel=self.kernel,
        )
        return _viewless(merged.view(s, b, -1)), u.view(s, b, -1), h_post_next, h_res_next

    def merge_contract(
        self,
        streams: torch.Tensor,
        h_res: torch.Tensor,
        h_post: torch.Tensor,
        output: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        dropout_p: float,
        dropout_keys: Optional[DropoutKeys] = None,
    ) -> torch.Tensor:
        """:meth:`merge` then :func:`contract_streams` in one op: the block output
        ``[s, b, C]`` after its last sublayer. ``streams`` as :meth:`merge_pre`."""
        s, b, _ = output.shape
        out = mhc_merge_contract(
            self._merge_input(streams), h_res, h_post, output.reshape(s * b, -1), bias, dropout_p=dropout_p,
            training=self.training, dropout_keys=dropout_keys, kernel=self.kernel,
        )
        return _viewless(out.view(s, b, -1))

    def _merge_input(self, streams: torch.Tensor) -> torch.Tensor:
        """``[s b, n, C]`` streams, or ``[s b, C]`` for the block input ``[s, b, C]``."""
        s, b, width = streams.shape
        if width == self.config.hidden_size:
            return streams.reshape(s * b, width)
        return self._as_streams(streams)

    def _with_maps(self, op, streams: torch.Tensor):
        """``op`` (mhc_mappings or mhc_pre) of the streams with this module's maps."""
        return op(
            self._as_streams(streams),
            self.projection,
            self.alpha,
            self.bias,
            iterations=self.config.mhc_sinkhorn_iterations,
            eps=self.config.layernorm_epsilon,
            kernel=self.kernel,
        )

    def merge(
        self,
        streams: torch.Tensor,
        h_res: torch.Tensor,
        h_post: torch.Tensor,
        output: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        dropout_p: float,
        dropout_keys: Optional[DropoutKeys] = None,
    ) -> torch.Tensor:
        """Bias-dropout-add of the sublayer ``output`` ``[s, b, C]`` into the mixed streams,
        ``[s, b, n C]``; ``dropout_keys`` key the ``s b`` tokens (needed when the dropout
        is active)."""
        s, b, _ = streams.shape
        merged = mhc_merge(
            self._as_streams(streams),
            h_res,
            h_post,
            output.reshape(s * b, -1),
            bias,
            dropout_p=dropout_p,
            training=self.training,
            dropout_keys=dropout_keys,
            kernel=self.kernel,
        )
        return _viewless(merged.view(s, b, -1))

    def _as_streams(self, streams: torch.Tensor) -> torch.Tensor:
        s, b, width = streams.shape
        if width % self.num_streams:
            raise ValueError(f"streams of width {width} do not split into {self.num_streams} residual streams")
        return streams.reshape(s * b, self.num_streams, width // self.num_streams)


def _viewless(tensor: torch.Tensor) -> torch.Tensor:
    """Not a view: the recompute manager swaps the storage of replayed outputs, which a
    view's base would keep alive."""
    return megatron_utils.make_viewless_tensor(tensor, requires_grad=tensor.requires_grad, keep_graph=True)


def expand_streams(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """``[s, b, C]`` -> ``[s, b, n C]``: n copies of the block input."""
    s, b, width = hidden.shape
    return input_expand(hidden.reshape(s * b, width), n).view(s, b, n * width)


def contract_streams(streams: torch.Tensor, n: int) -> torch.Tensor:
    """``[s, b, n C]`` -> ``[s, b, C]``: the mean of the streams."""
    s, b, width = streams.shape
    return output_contract(streams.reshape(s * b, n, width // n)).view(s, b, -1)
