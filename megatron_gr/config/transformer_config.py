"""``GRTransformerConfig``: megatron's ``TransformerConfig`` plus the fields that
recommendation layers read (STU/HSTU attention, encodings, the retrieval task)."""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Literal, Optional

from megatron.core.transformer import TransformerConfig

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.fp8_validation import validate_fp8
from megatron_gr.config.transducer_config import TransducerConfig, validate_transducers, validate_truncation
from megatron_gr.config.validation import check_choice, check_dropout, check_float_range, check_int_range, require
from megatron_gr.ops.time_buckets import TIME_BUCKET_FNS

MODEL_TYPES = ("retrieval", "ranking")
ATTENTION_NORMALIZERS = ("max_seq_len", "seq_len")
BLOCK_TYPES = ("stu", "transformer")
TIME_FEATURES = ("since_previous", "until_query", "none")
TIME_BIAS_ORIGINS = ("token", "query")
POSITION_ENCODINGS = ("from_start", "from_end", "none")
RETRIEVAL_LOSSES = ("sampled_softmax", "full_softmax")
OUTPUT_NORMALIZATIONS = ("l2", "none")
# Our entry in megatron's ``recompute_modules``: the hyper-connection ops of every layer.
MHC_RECOMPUTE_MODULE = "mhc"


@dataclass
class GRTransformerConfig(TransformerConfig):
    type: Literal["retrieval", "ranking"] = "retrieval"
    """The model family, which picks its training recipe (``megatron_gr.models.registry``):
    ``retrieval`` (HSTU next-item retrieval) or ``ranking`` (DLRM-HSTU, configured by the
    ``ranking`` section)."""

    # ---------------- layers ----------------
    block_type: Literal["stu", "transformer"] = "stu"
    """Layers of the retrieval model: ``stu`` (HSTU) or ``transformer``, megatron's
    transformer layer (softmax self-attention + MLP, pre-norm) with a final layer norm, i.e.
    SASRec. Transformer layers use ``num_attention_heads`` heads of hidden_size / heads,
    ``ffn_hidden_size`` and ``attention_dropout``; the STU fields below (head dims, windows,
    relative bias) apply to STU layers only."""

    # ---------------- STU (HSTU) attention ----------------
    qk_head_dim: int = 64
    """Per-head dimension of queries and keys in STU attention."""

    v_head_dim: int = 64
    """Per-head dimension of values and of U, the gating branch that multiplies the
    normalised attention output."""

    max_seq_len: int = 200
    """Most tokens one sequence may hold (contextual tokens included); longer histories keep
    their most recent events. Sizes the position embeddings and, with
    ``attention_normalizer='max_seq_len'``, divides the attention scores."""

    contextual_len: int = 0
    """Contextual tokens at the start of every sequence: they see each other and every token
    sees them."""

    max_attn_len: int = 0
    """Local attention window: a token attends to itself and the ``max_attn_len`` tokens
    before it (0 = the whole causal prefix)."""

    sla_k1: int = 0
    """Semi-local attention: the local window K1 (a token sees itself and the K1 tokens
    before it) combined with a global prefix of ``sla_k2`` tokens; 0 = off. Replaces
    ``max_attn_len`` (set one of them). Exact rules: ``megatron_gr/ops/attention_mask.py``."""

    sla_k2: int = 0
    """Semi-local attention: the first K2 tokens of every sequence (contextual tokens
    included), seen causally by every later token however far back; needs ``sla_k1 > 0``."""

    attention_normalizer: Literal["max_seq_len", "seq_len"] = "max_seq_len"
    """What SiLU attention scores are divided by: the configured ``max_seq_len`` (as in the
    HSTU paper) or the actual length of each sequence."""

    attention_alpha: Optional[float] = None
    """Scale of q.k before the SiLU; None means 1/sqrt(qk_head_dim)."""

    attention_dropout: float = 0.0
    """Dropout on softmax attention weights of ``transformer`` layers. STU attention has none
    (its kernels do not implement it): must stay 0 there, where ``hidden_dropout`` acts after
    the gated attention output."""

    embedding_dropout: float = 0.2
    """Dropout on the input token embeddings (item embedding plus encodings). Like
    ``hidden_dropout`` its mask is keyed by (seed, step, site, sample, position, feature), so
    every parallel layout drops the same elements (``megatron_gr/ops/keyed_dropout.py``)."""

    # ---------------- position and time encodings ----------------
    num_position_buckets: int = 256
    """Buckets of the relative position bias: distances i - j >= num_position_buckets - 1
    share the last bucket."""

    num_time_buckets: int = 128
    """Buckets for time gaps, used by the time encoding of each event (``time_feature``) and
    by the relative time bias (``time_bias_origin``)."""

    time_bucket_fn: Literal["sqrt", "log", "hstu_log"] = "sqrt"
    """How a gap in seconds maps to a bucket: floor(sqrt(gap)), floor(log2(gap + 1)) or
    ``hstu_log``, floor(ln(max(gap, 1)) / 0.301) as in the HSTU reference code; clipped to
    the last bucket."""

    relative_attention_bias: bool = True
    """Add a learned relative position + time bias to STU attention scores."""

    # A token's *query time* is the time of the event it predicts: its label's timestamp in
    # training; at evaluation the next input event's, and for a sequence's last token the
    # held-out target's (known when the recommendation is requested, as in the HSTU paper;
    # the target item itself is never revealed). See ``JaggedBatch.query_timestamps``.
    time_feature: Literal["since_previous", "until_query", "none"] = "since_previous"
    """Time encoding added to each input token (one learned vector per time bucket):
    ``since_previous``, the gap from the previous event of the window (0 for the first);
    ``until_query``, the gap from the token's event to its query time (the HSTU paper's
    time-to-query feature, per token); ``none`` (the HSTU reference's MovieLens runs)."""

    time_bias_origin: Literal["token", "query"] = "token"
    """Relative time bias of query i and key j: the bucket of |ts_i - ts_j| (``token``) or
    of tq_i - ts_j with tq_i the query time of token i (``query``: the HSTU reference's
    ts_{i+1} - ts_j). ``query`` runs on the PyTorch attention reference only."""

    position_encoding: Literal["from_start", "from_end", "none"] = "from_start"
    """Learned absolute position embedding of each input token: its position counted from
    the first event of the window (the HSTU reference and SASRec), from the last event
    (recency, as the production HSTU encoder counts), or none."""

    scale_item_embeddings: bool = True
    """Multiply input item embeddings by sqrt(hidden_size) before the encodings are added
    (the HSTU reference and the original SASRec do; RecBole's SASRec does not)."""

    # ---------------- retrieval task ----------------
    num_negatives: int = 128
    """Negatives drawn uniformly from the item corpus once per optimizer step (by the data
    loader, for the whole global batch), shared by all its positions on every rank."""

    num_in_batch_negatives: int = 128
    """Negatives drawn once per optimizer step from the target items of the whole global
    batch (so popular items appear in proportion to their frequency), shared by all its
    positions on every rank."""

    softmax_temperature: float = 0.05
    """Temperature of the softmax: scores are divided by it."""

    retrieval_loss: Literal["sampled_softmax", "full_softmax"] = "sampled_softmax"
    """``sampled_softmax``: each label against the shared ``num_negatives`` +
    ``num_in_batch_negatives`` negatives; ``full_softmax``: against every other item of the
    corpus (exact cross-entropy, as SASRec's CE loss; T x num_items scores per micro-batch,
    meant for corpora up to ~10^5 items)."""

    output_normalization: Literal["l2", "none"] = "l2"
    """``l2``: user states and item embeddings are L2-normalised, scores are cosine
    similarities (the HSTU reference); ``none``: raw dot products (SASRec; use
    ``softmax_temperature=1``)."""

    # ---------------- context parallelism ----------------
    context_parallel_split_threshold: int = 1024
    """Sequences longer than this are split over the context-parallel ranks, shorter ones
    stay whole on one; filled from ``parallel.context_parallel_split_threshold`` (see
    there), as ``context_parallel_size`` is from ``parallel.context_parallel_size``."""

    # ---------------- manifold-constrained hyper-connections (mHC) ----------------
    enable_hyper_connections: bool = False
    """Widen the residual stream into ``num_residual_streams`` streams that every sublayer
    reads through a learned per-token weighting and writes back through a per-token doubly
    stochastic mixing (mHC, arXiv 2512.24880). Layers exchange ``[T, 1, n * hidden_size]``."""

    num_residual_streams: int = 4
    """n, the number of residual streams (>= 2 with hyper-connections on)."""

    mhc_sinkhorn_iterations: int = 20
    """Sinkhorn-Knopp iterations (a row then a column normalisation each) that make the
    stream-mixing matrix doubly stochastic."""

    mhc_init_gating_factor: float = 0.01
    """Initial alpha, the gate on the token-dependent part of the mHC logits; 0 starts
    every token with the same static mixing."""

    mhc_fuse_merge_pre: bool = False
    """In a block that fuses its hyper-connection ops (the Triton backend), also run each
    merge and the next sublayer's pre op as one kernel pair (``mhc_merge_pre``) instead of
    the merge kernel and then the pre op. Off by default: on an H100 at hidden 1024, n = 4,
    the pair took 3.19 / 5.01 ms forward / backward per sublayer at 65,536 tokens against
    0.96 / 2.61 ms for the two (``docs/benchmarks/mhc.md``), although it moves 40% fewer
    bytes. The expansion and the contraction stay fused either way."""

    mhc_recompute_layer_num: Optional[int] = None
    """Layers per recompute block when ``recompute_modules`` holds ``'mhc'``: the
    hyper-connection intermediates of a block are dropped after its forward and recomputed
    when its backward starts, so only block inputs stay. None: the paper's optimum
    round(sqrt(n L / (n + 2))) for the L layers of the pipeline stage (see
    :meth:`mhc_recompute_block_size`). Blocks are cut within each pipeline stage: none spans
    two stages, and a stage's last block holds what is left of its layers."""

    # ---------------- FP8 (megatron's fields: fp8, fp8_amax_history_len, ...) ----------------
    fp8_recipe: Optional[Literal["delayed", "tensorwise", "rowwise", "mxfp8", "blockwise", "custom"]] = "delayed"
    """megatron's FP8 recipe field, with ``rowwise`` added. Without Transformer Engine the
    native FP8 linears run ``delayed`` (per-tensor scales from an amax history of
    ``fp8_amax_history_len`` micro-batches, ``fp8_amax_compute_algo``), ``tensorwise``
    (per-tensor scales from each tensor's own amax) or ``rowwise`` (one scale per token and
    per output feature); with Transformer Engine installed megatron's recipes apply
    (``delayed``, ``tensorwise``, ``mxfp8``, ``blockwise``, ``custom``). Only read when
    ``fp8`` (``e4m3`` or ``hybrid``: e5m2 gradients) is set."""

    # ---------------- ULTRA-HSTU (ranking) ----------------
    transducers: Optional[list[TransducerConfig]] = None
    """Mixture of transducers: one STU stack per behaviour channel (``transducer_config.py``);
    None: one unnamed channel, DLRM-HSTU's single stack. Ranking only."""

    attn_truncation_split_layer: int = 0
    """Attention truncation: after this many layers only the last
    ``attn_truncation_tail_len`` history events of each user go on (contextual tokens and
    candidates stay); 0 = off. Channels may set their own. Ranking only."""

    attn_truncation_tail_len: int = 0
    """History events kept after ``attn_truncation_split_layer``."""

    recompute_normed_x: bool = False
    """Recompute the input layer norm of every STU layer in the backward instead of keeping
    it (ranking; without hyper-connections, whose ``'mhc'`` recompute covers the norm)."""

    recompute_uvqk: bool = False
    """Recompute U, V, Q, K (the SiLU of the fused projection) of every STU layer in the
    backward instead of keeping them (ranking)."""

    def __post_init__(self):
        # Our shape checks first: the base class divides by some of these fields.
        check_choice("type", self.type, MODEL_TYPES)
        self._validate_shapes()
        # megatron checks recompute_modules against its own list: hide our entry from it.
        modules = self.recompute_modules
        recompute_mhc = modules is not None and MHC_RECOMPUTE_MODULE in modules
        if recompute_mhc:
            self.recompute_modules = [m for m in modules if m != MHC_RECOMPUTE_MODULE]
        try:
            super().__post_init__()
        except (AssertionError, ValueError, TypeError, ZeroDivisionError) as error:
            raise ConfigError(f"megatron TransformerConfig rejected the model settings: {error}") from None
        finally:
            if recompute_mhc:
                self.recompute_modules = list(self.recompute_modules or []) + [MHC_RECOMPUTE_MODULE]
        self._validate_attention()
        self._validate_block()
        self._validate_encodings()
        self._validate_task()
        self._validate_hyper_connections()
        validate_fp8(self)
        self._validate_ultra()

    def _validate_shapes(self) -> None:
        check_int_range("num_layers", self.num_layers, low=1)
        check_int_range("hidden_size", self.hidden_size, low=1)
        check_int_range("num_attention_heads", self.num_attention_heads, low=1)
        check_int_range("qk_head_dim", self.qk_head_dim, low=1, high=1024)
        check_int_range("v_head_dim", self.v_head_dim, low=1, high=1024)
        check_int_range("max_seq_len", self.max_seq_len, low=2)
        check_int_range("contextual_len", self.contextual_len, low=0)
        require(
            self.contextual_len < self.max_seq_len,
            f"contextual_len={self.contextual_len} must be smaller than "
            f"max_seq_len={self.max_seq_len} to leave room for events",
        )

    def _validate_attention(self) -> None:
        check_int_range("max_attn_len", self.max_attn_len, low=0)
        check_int_range("sla_k1", self.sla_k1, low=0)
        check_int_range("sla_k2", self.sla_k2, low=0)
        require(
            not (self.sla_k1 > 0 and self.max_attn_len > 0),
            f"sla_k1={self.sla_k1} and max_attn_len={self.max_attn_len} are both local windows: "
            "set max_attn_len=0 for semi-local attention, or sla_k1=0",
        )
        require(
            self.sla_k2 == 0 or self.sla_k1 > 0,
            f"sla_k2={self.sla_k2} needs a local window: set sla_k1 > 0 (without one every token "
            "already sees the whole prefix), or sla_k2=0",
        )
        check_choice("attention_normalizer", self.attention_normalizer, ATTENTION_NORMALIZERS)
        if self.attention_alpha is not None:
            check_float_range("attention_alpha", self.attention_alpha, low=0.0, low_exclusive=True)
        check_dropout("hidden_dropout", self.hidden_dropout)
        check_dropout("embedding_dropout", self.embedding_dropout)
        check_dropout("attention_dropout", self.attention_dropout)
        require(
            self.attention_dropout == 0.0 or self.block_type == "transformer",
            f"attention_dropout={self.attention_dropout!r} is not supported by STU attention: "
            "set it to 0 and use hidden_dropout",
        )

    def _validate_block(self) -> None:
        check_choice("block_type", self.block_type, BLOCK_TYPES)
        if self.block_type != "transformer":
            return
        for name in ("max_attn_len", "sla_k1", "contextual_len"):
            require(
                getattr(self, name) == 0,
                f"{name}={getattr(self, name)} applies to STU layers only: set it to 0 with block_type='transformer'",
            )

    def _validate_encodings(self) -> None:
        check_int_range("num_position_buckets", self.num_position_buckets, low=1)
        check_int_range("num_time_buckets", self.num_time_buckets, low=1)
        check_choice("time_bucket_fn", self.time_bucket_fn, TIME_BUCKET_FNS)
        check_choice("time_feature", self.time_feature, TIME_FEATURES)
        check_choice("time_bias_origin", self.time_bias_origin, TIME_BIAS_ORIGINS)
        check_choice("position_encoding", self.position_encoding, POSITION_ENCODINGS)
        require(
            isinstance(self.scale_item_embeddings, bool),
            f"scale_item_embeddings={self.scale_item_embeddings!r} must be true or false",
        )

    def _validate_task(self) -> None:
        check_int_range("num_negatives", self.num_negatives, low=0)
        check_int_range("num_in_batch_negatives", self.num_in_batch_negatives, low=0)
        check_float_range("softmax_temperature", self.softmax_temperature, low=0.0, low_exclusive=True)
        check_choice("retrieval_loss", self.retrieval_loss, RETRIEVAL_LOSSES)
        check_choice("output_normalization", self.output_normalization, OUTPUT_NORMALIZATIONS)
        require(
            self.num_negatives + self.num_in_batch_negatives > 0,
            "num_negatives=0 and num_in_batch_negatives=0 leave the sampled softmax without "
            "negatives: set one of them >= 1",
        )

    def _validate_hyper_connections(self) -> None:
        on = self.enable_hyper_connections
        check_int_range("num_residual_streams", self.num_residual_streams, low=2 if on else 1)
        check_int_range("mhc_sinkhorn_iterations", self.mhc_sinkhorn_iterations, low=1)
        check_float_range("mhc_init_gating_factor", self.mhc_init_gating_factor, low=0.0)
        if self.mhc_recompute_layer_num is not None:
            check_int_range("mhc_recompute_layer_num", self.mhc_recompute_layer_num, low=1)
        if self.recompute_mhc:
            require(on, "recompute_modules holds 'mhc' but enable_hyper_connections=False: drop 'mhc' or enable them")
            require(
                self.recompute_granularity == "selective",
                f"recompute_modules holds 'mhc' but recompute_granularity={self.recompute_granularity!r}: "
                "mHC recompute is selective, set recompute_granularity='selective'",
            )
        else:
            require(
                self.mhc_recompute_layer_num is None,
                f"mhc_recompute_layer_num={self.mhc_recompute_layer_num} has no effect without 'mhc' in "
                "recompute_modules (and recompute_granularity='selective')",
            )
        if not on:
            return
        if self.recompute_granularity == "selective":
            for module in ("layernorm", "mlp"):
                require(
                    module not in self.recompute_modules,
                    f"recompute_modules holds {module!r}, which hyper-connection layers do not recompute: "
                    "use 'mhc' (it recomputes the sublayer norms with the hyper-connection ops)",
                )
        unsupported = {
            "virtual_pipeline_model_parallel_size": (self.virtual_pipeline_model_parallel_size, None),
            "fp4": (self.fp4, None),
            "num_moe_experts": (self.num_moe_experts, None),
            "cpu_offloading": (self.cpu_offloading, False),
            "fine_grained_activation_offloading": (self.fine_grained_activation_offloading, False),
            "cuda_graph_impl": (self.cuda_graph_impl, "none"),
        }
        for name, (value, supported) in unsupported.items():
            require(
                value == supported,
                f"{name}={value!r} is not supported with enable_hyper_connections=True yet: use {supported!r}",
            )

    def _validate_ultra(self) -> None:
        validate_transducers(self.transducers)
        validate_truncation(self.attn_truncation_split_layer, self.attn_truncation_tail_len, self.num_layers, "model.")
        if self.type != "ranking":
            for name in ("transducers", "attn_truncation_split_layer", "recompute_normed_x", "recompute_uvqk"):
                require(
                    not getattr(self, name),
                    f"{name}={getattr(self, name)!r} applies to the ranking model (ULTRA-HSTU): set type=ranking or drop it",
                )
        require(
            not (self.recompute_normed_x and self.enable_hyper_connections),
            "recompute_normed_x=True with enable_hyper_connections=True: the norm then belongs to the "
            "hyper-connection ops; use recompute_modules=[mhc] (recompute_granularity=selective) instead",
        )

    @property
    def uses_transducers(self) -> bool:
        """The ranking model runs ULTRA-HSTU (channels, truncation or rematerialization)."""
        return bool(self.transducers or self.attn_truncation_split_layer or self.recompute_normed_x or self.recompute_uvqk)

    @property
    def recompute_mhc(self) -> bool:
        """'mhc' is in ``recompute_modules``: drop hyper-connection intermediates after the
        forward of each recompute block and recompute them in its backward."""
        return self.recompute_modules is not None and MHC_RECOMPUTE_MODULE in self.recompute_modules

    def mhc_recompute_block_size(self, num_layers: int) -> int:
        """Layers per mHC recompute block for a stage of ``num_layers`` layers: the
        configured number, or the paper's sqrt(n L / (n + 2)) which balances the kept block
        inputs (n C per token per block) against one block's recomputed intermediates."""
        if self.mhc_recompute_layer_num is not None:
            return self.mhc_recompute_layer_num
        n = self.num_residual_streams
        return max(1, round(math.sqrt(n * num_layers / (n + 2))))

    @property
    def attention_window(self) -> tuple[int, int]:
        """``(window, global prefix)`` of the attention op: ``(sla_k1, sla_k2)`` under
        semi-local attention, else ``(max_attn_len, 0)``."""
        if self.sla_k1 > 0:
            return self.sla_k1, self.sla_k2
        return self.max_attn_len, 0

    @property
    def alpha(self) -> float:
        return self.attention_alpha if self.attention_alpha is not None else self.qk_head_dim**-0.5
