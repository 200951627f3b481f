"""HSTU retrieval (next-item prediction) on megatron-core."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.data.jagged import JaggedBatch
from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.models.preprocessor import InputPreprocessor
from megatron_gr.models.retrieval_head import full_corpus_ranks, full_softmax_loss, sampled_softmax_loss
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.seeding import keyed_init
from megatron_gr.transformer.context_parallel import BatchShard
from megatron_gr.transformer.dropout_sites import EMBEDDING
from megatron_gr.transformer.graph_buckets import TokenBuckets
from megatron_gr.transformer.sequence_parallel import TokenSplit
from megatron_gr.transformer.specs import get_retrieval_block_spec


class HSTURetrievalModel(MegatronModule):
    """Item table -> encodings -> STU block -> L2-normalised user states.

    ``config.block_type='transformer'`` puts megatron's transformer layers in place of the
    STU layers (SASRec); ``config.output_normalization='none'`` keeps the user states and
    item rows unnormalised (dot-product scores); ``config.retrieval_loss='full_softmax'``
    trains against the whole corpus instead of sampled negatives.

    With ``config.enable_hyper_connections`` the block carries n residual streams between
    its layers (expanded after the encodings, averaged before the L2 norm). Under context
    parallelism each rank computes its share of the tokens (:class:`BatchShard`): the loss
    of its tokens, the ranks of the sequences that end on it.

    ``forward`` on a training batch (with ``labels``) returns the per-token sampled-softmax
    loss ``[T]``; on an evaluation batch (with ``target_ids``) the full-corpus rank of each
    target ``[B]``. On a pipeline stage that is not the last it returns the hidden states.

    Item ids are whatever the item table is keyed by: dense ids 1..num_items for a plain
    table, raw ids for a hash table. ``corpus_ids`` ``[num_items]`` lists the corpus in the
    table's ids (default: the dense ids); uniform negatives and evaluation ranks draw from it.

    Under pipeline parallelism the item table lives on the first stage (inputs) and on the
    last (loss and ranking): the two copies are megatron's shared embedding (same start
    values, gradients all-reduced over the embedding group, saved once); middle stages have
    no table (``item_table=None``).

    ``backend`` runs the layers' ops (PyTorch or Triton); with ``init_seed`` every module
    draws its initial values under its own key (``megatron_gr.seeding``), so a pipeline
    stage builds only its own layers and still starts where a single-rank model does.
    """

    # The item table embeds the inputs and scores the outputs: megatron's tied embedding.
    share_embeddings_and_output_weights = True

    def __init__(
        self,
        config: GRTransformerConfig,
        item_table: Optional[EmbeddingTable],
        num_items: int,
        *,
        corpus_ids: Optional[torch.Tensor] = None,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        backend: KernelBackend = KernelBackend.PYTORCH,
        init_seed: Optional[int] = None,
    ):
        super().__init__(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = pre_process
        self.post_process = post_process
        self.num_items = num_items
        if item_table is None and (pre_process or post_process):
            raise ValueError("the first and the last pipeline stage need the item table")
        if corpus_ids is None:
            corpus_ids = torch.arange(1, num_items + 1)
        if corpus_ids.shape != (num_items,):
            raise ValueError(f"corpus_ids must hold num_items={num_items} ids, got shape {tuple(corpus_ids.shape)}")
        self.register_buffer("corpus_ids", corpus_ids.to(torch.int64), persistent=False)
        self.item_table = item_table
        # Sequence parallelism splits the tokens over the tensor-parallel group, context
        # parallelism the sequences over the context-parallel group.
        self.token_group = pg_collection.tp if config.sequence_parallel else None
        self.context_group = pg_collection.cp if config.context_parallel_size > 1 else None
        # CUDA graphs (training.cuda_graphs) pad training batches to static token counts.
        self.token_buckets: Optional[TokenBuckets] = None
        with keyed_init(init_seed, "preprocessor"):
            self.preprocessor = InputPreprocessor(config, backend=backend) if pre_process else None
        spec = get_retrieval_block_spec(
            config, backend=backend, init_seed=init_seed, vp_stage=vp_stage, pp_rank=get_pg_rank(pg_collection.pp)
        )
        self.decoder = spec.module(
            config,
            spec,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        """The item table's weight on the stages that hold it (megatron reduces its
        gradient over the first and last stage)."""
        return self.item_table.weight if self.item_table is not None else None

    def encode(
        self, batch: JaggedBatch, *, shard: Optional[BatchShard] = None, item_rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """This stage's output: the hidden states ``[T, 1, C]`` on a stage that is not the
        last; on the last, the user state after each of this rank's tokens ``[T, C]``
        (L2-normalised with ``output_normalization='l2'``), which training, evaluation and
        the exported serving program all score. ``shard``: this rank's context-parallel
        share of the tokens (default: computed from ``batch``); ``item_rows``: the item
        table's rows of the shard's ``item_ids`` (default: looked up here)."""
        shard = self._shard(batch) if shard is None else shard
        buckets = self.token_buckets if self.training else None
        tokens = TokenSplit.for_tokens(
            shard.num_tokens(batch.num_tokens), self.token_group, never_empty=self.context_group is not None,
            num_sequences=batch.batch_size, buckets=buckets,
        )
        params = shard.seq_params(
            tokens, batch.offsets, batch.max_len, timestamps=batch.timestamps, query_timestamps=batch.query_timestamps,
            token_keys=batch.token_keys, dropout_seed=batch.dropout_seed,
        )
        hidden = None
        if self.pre_process:
            keys = None
            if batch.token_keys is not None:
                keys = DropoutKeys(seed=batch.dropout_seed, site=EMBEDDING, token_keys=shard.take(batch.token_keys))
            if item_rows is None:
                item_rows = self.item_table(shard.take(batch.item_ids))
            hidden = self.preprocessor(
                item_rows, batch.offsets, batch.timestamps,
                query_timestamps=batch.query_timestamps, dropout_keys=keys, tokens=shard.token_index,
            )
            hidden = tokens.scatter(hidden)
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, packed_seq_params=params)
        if not self.post_process:
            return hidden
        hidden = tokens.gather(hidden)
        user = hidden.squeeze(1).float()  # [T, C]
        return F.normalize(user, dim=-1) if self.config.output_normalization == "l2" else user

    def forward(self, batch: JaggedBatch) -> torch.Tensor:
        if batch.labels is not None and (batch.negative_ids is None or batch.token_keys is None):
            raise ValueError("a training batch needs negative_ids and token_keys (TrainingBatches draws them)")
        shard = self._shard(batch)
        computes_loss = batch.labels is not None and self.post_process
        full_softmax = self.config.retrieval_loss == "full_softmax"
        if computes_loss:
            labels = shard.take(batch.labels)
            candidates = self.corpus_ids if full_softmax else batch.negative_ids
        # The inputs', labels' and candidates' rows in one lookup: a hash table answers it
        # with one dedupe (and across ranks one exchange) instead of one per lookup.
        wanted = ([shard.take(batch.item_ids)] if self.pre_process else []) + ([labels, candidates] if computes_loss else [])
        rows = self.item_table.lookup_many(wanted) if wanted else []
        user = self.encode(batch, shard=shard, item_rows=rows[0] if self.pre_process else None)
        if not self.post_process:
            return user
        normalize = self.config.output_normalization == "l2"
        if computes_loss and full_softmax:
            return full_softmax_loss(
                user, labels, rows[-2], corpus_ids=candidates, corpus_rows=rows[-1],
                temperature=self.config.softmax_temperature, normalize_items=normalize,
            )
        if computes_loss:
            return sampled_softmax_loss(
                user, labels, rows[-2], negative_ids=candidates, negative_rows=rows[-1],
                temperature=self.config.softmax_temperature, normalize_items=normalize,
            )
        if batch.target_ids is None:
            raise ValueError("a batch needs labels (training) or target_ids (evaluation)")
        last, sequences = shard.last_tokens(batch.offsets)  # the state after each whole sequence
        targets = batch.target_ids if sequences is None else batch.target_ids[sequences]
        return full_corpus_ranks(user[last], targets, self.item_table, corpus_ids=self.corpus_ids, normalize_items=normalize)

    def _shard(self, batch: JaggedBatch) -> BatchShard:
        """The tokens of ``batch`` this rank computes: all of them, or its context-parallel share."""
        return BatchShard.of_batch(batch, group=self.context_group, config=self.config)

    def evaluation_cache(self) -> ContextManager[None]:
        """Evaluation reads only corpus items: a sharded item table fetches them once, so
        evaluation batches need no exchange between ranks (which may hold different
        numbers of batches)."""
        if self.item_table is None:  # a middle pipeline stage
            return contextlib.nullcontext()
        return self.item_table.evaluation_cache(self.corpus_ids)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The last stage's copy of the item table is saved as a replica of the first
        stage's (the same key), so a checkpoint holds the table once and loads into either."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.post_process and not self.pre_process:
            table = state[f"{prefix}item_table.weight"]
            table.replica_id = (1, *table.replica_id[1:])
        return state
