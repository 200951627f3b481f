"""Jagged metadata handed to every STU layer, in the place megatron passes packed-sequence
parameters (``packed_seq_params``), so megatron's ``TransformerBlock`` carries it through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class JaggedSeqParams(PackedSeqParams):
    """``cu_seqlens_q`` = offsets ``[B + 1]``, ``max_seqlen_q`` = longest sequence (a Python
    int computed once per batch, so layers never synchronise to find it).

    Keyed dropout (:mod:`megatron_gr.ops.keyed_dropout`): ``dropout_seed`` and the tokens'
    keys, ``token_keys`` for every token of the (padded) batch, as attention sees them, and
    ``local_token_keys`` for this rank's tokens between attention blocks (its
    sequence-parallel slice; all tokens without sequence parallelism). None: the batch
    has no keys (evaluation, layers used on their own). ``dropout_words``: the step's
    stream words of every dropout site on the device, which the dropout kernels then read
    instead of words computed from ``dropout_seed`` on the host (CUDA graphs,
    ``training/cuda_graphs.py``: a replayed kernel keeps the host arguments of its capture)."""

    timestamps: Optional[torch.Tensor] = None  # [T] int64, for the relative time bias
    # [T] int64, the time of the event each token predicts (``JaggedBatch.query_timestamps``)
    query_timestamps: Optional[torch.Tensor] = None
    num_targets: Optional[torch.Tensor] = None  # [B] int64, target tokens at each sequence end
    dropout_seed: int = 0  # the step's dropout seed
    token_keys: Optional[torch.Tensor] = None  # [T] int64
    local_token_keys: Optional[torch.Tensor] = None  # [T / tp] int64 under sequence parallelism, else [T]
    # [sites, 3] int64: row s = stream_words(dropout_seed, s) (dropout_sites); None: host words
    dropout_words: Optional[torch.Tensor] = None
    # Per-batch values that every layer would otherwise recompute (e.g. bias bucket ids).
    cache: dict[str, Any] = field(default_factory=dict)
    # Context parallelism: the keys of other ranks the layers' attention needs (a
    # transformer.context_parallel.ContextAttention); None: sequences are whole here.
    context_parallel: Optional[Any] = None

    @classmethod
    def from_offsets(
        cls,
        offsets: torch.Tensor,
        max_len: int,
        timestamps: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
        query_timestamps: Optional[torch.Tensor] = None,
        *,
        dropout_seed: int = 0,
        token_keys: Optional[torch.Tensor] = None,
        local_token_keys: Optional[torch.Tensor] = None,
    ) -> "JaggedSeqParams":
        return cls(
            qkv_format="thd",
            cu_seqlens_q=offsets,
            cu_seqlens_kv=offsets,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
            timestamps=timestamps,
            num_targets=num_targets,
            query_timestamps=query_timestamps,
            dropout_seed=dropout_seed,
            token_keys=token_keys,
            local_token_keys=token_keys if local_token_keys is None else local_token_keys,
        )

    @property
    def offsets(self) -> torch.Tensor:
        return self.cu_seqlens_q

    @property
    def max_len(self) -> int:
        return self.max_seqlen_q
