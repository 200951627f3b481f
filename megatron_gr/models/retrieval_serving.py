"""The serving computation of HSTU retrieval, as a plain module that ``torch.export`` traces:
a jagged batch of histories -> each user's embedding and the top-k items of the corpus.

It calls the trained model's own ``encode`` (the code training and evaluation run, not a
re-implementation), so served scores are the evaluation's scores by construction; only
the padding width differs (every history is padded to ``max_seq_len`` instead of to the
batch's longest, so the program has no data-dependent shapes), which adds exact zeros to
the attention sums. The corpus embeddings are computed once at export (the item table's
rows, L2-normalised with ``output_normalization='l2'``, as evaluation scores them) and
stored in the program.

Inputs (table ids: dense item ids 1..num_items for a plain item table)::

    item_ids     [T] int64      every user's history, packed (histories of at most max_seq_len)
    timestamps   [T] int64      their event times (seconds)
    offsets      [B + 1] int64  history b is tokens offsets[b]:offsets[b + 1]
    query_times  [B] int64      only for a model that reads query times (``time_feature:
                                until_query`` or ``time_bias_origin: query``): when each
                                user's recommendation is requested (seconds). A history's
                                last token is queried at it, every other token at the time
                                of the next event, as evaluation does with the held-out
                                target's time.

Outputs: ``user`` [B, C] float32, ``scores`` [B, k] (cosine similarities with ``l2``,
else dot products; descending) and ``items`` [B, k] int64 (table ids of the corpus).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.data.jagged import JaggedBatch
from megatron_gr.models.retrieval_head import item_vectors

_MAX_TOKENS = 1 << 30
_MAX_USERS = 1 << 24


def reads_query_times(config) -> bool:
    """Whether the model's forward reads ``JaggedBatch.query_timestamps``."""
    query_bias = config.relative_attention_bias and config.time_bias_origin == "query" and config.block_type == "stu"
    return config.time_feature == "until_query" or query_bias


class RetrievalServing(torch.nn.Module):
    def __init__(self, model, *, top_k: int = 10, corpus_ids: Optional[torch.Tensor] = None):
        super().__init__()
        if not (model.pre_process and model.post_process) or model.context_group is not None:
            raise ValueError("serving needs the whole model on one process (tensor, pipeline and context size 1)")
        if type(model.item_table).__name__ == "DynamicEmbedding":
            raise ValueError(
                "embeddings.item.type=dynamic: exporting a hash-table item table is not supported yet "
                "(its lookups are not traceable); export a model with a plain item table"
            )
        corpus_ids = model.corpus_ids if corpus_ids is None else corpus_ids
        if not 1 <= top_k <= corpus_ids.numel():
            raise ValueError(f"top_k={top_k} must be between 1 and the corpus size {corpus_ids.numel()}")
        self.model = model.eval()
        self.top_k = top_k
        self.max_seq_len = model.config.max_seq_len
        self.needs_query_times = reads_query_times(model.config)
        normalize = model.config.output_normalization == "l2"
        with torch.no_grad():
            self.register_buffer("corpus_ids", corpus_ids.clone())
            corpus = item_vectors(model.item_table, corpus_ids, normalize=normalize).float()  # [N, C]
            self.register_buffer("corpus_embeddings", corpus)

    def forward(
        self,
        item_ids: torch.Tensor,
        timestamps: torch.Tensor,
        offsets: torch.Tensor,
        query_times: Optional[torch.Tensor] = None,
    ):
        if (query_times is not None) != self.needs_query_times:
            raise ValueError(
                "this model reads query times (time_feature=until_query or time_bias_origin=query): pass query_times [B]"
                if self.needs_query_times else "this model reads no query times: call it without query_times"
            )
        num_users = offsets.shape[0] - 1
        # One more history of two padding tokens, dropped at the end: the traced program
        # then never meets one user or one token, sizes that torch.export specialises on.
        # Attention stays inside each history, so no user sees it.
        item_ids = torch.cat([item_ids, item_ids.new_zeros(2)])
        timestamps = torch.cat([timestamps, timestamps.new_zeros(2)])
        offsets = torch.cat([offsets, offsets[-1:] + 2])
        last = offsets[1:] - 1  # [B + 1]: each history's last token
        query_timestamps = None
        if query_times is not None:
            following = torch.cat([timestamps[1:], timestamps[-1:]])  # [T + 2]: the next event's time
            query_timestamps = following.index_put((last,), torch.cat([query_times, query_times.new_zeros(1)]))
        batch = JaggedBatch(
            item_ids=item_ids, timestamps=timestamps, ratings=torch.zeros_like(item_ids, dtype=torch.float32),
            offsets=offsets, user_ids=offsets[1:], max_len=self.max_seq_len, query_timestamps=query_timestamps,
        )
        user = self.model.encode(batch)[last]  # [B + 1, C]: the state after each whole history
        scores = user @ self.corpus_embeddings.t()  # [B + 1, N]
        top = torch.topk(scores, self.top_k, dim=1)
        return user[:num_users], top.values[:num_users], self.corpus_ids[top.indices[:num_users]]

    def example_inputs(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        """The program's inputs for the histories of an evaluation batch (in ``forward``'s
        order): each history's last token is queried at its held-out target's time."""
        inputs = {"item_ids": batch.item_ids, "timestamps": batch.timestamps, "offsets": batch.offsets}
        if self.needs_query_times:
            inputs["query_times"] = batch.query_timestamps[batch.offsets[1:] - 1]
        return inputs

    def dynamic_shapes(self) -> dict:
        tokens, users = torch.export.Dim("tokens", min=1, max=_MAX_TOKENS), torch.export.Dim("users", min=1, max=_MAX_USERS)
        dynamic = {"item_ids": {0: tokens}, "timestamps": {0: tokens}, "offsets": {0: users + 1}}
        if self.needs_query_times:
            dynamic["query_times"] = {0: users}
        return dynamic

    def described_inputs(self) -> dict[str, str]:
        described = {"item_ids": "[T] int64 table ids", "timestamps": "[T] int64 seconds", "offsets": "[B + 1] int64"}
        if self.needs_query_times:
            described["query_times"] = "[B] int64 seconds: when each user's recommendation is requested"
        return described

    def described_outputs(self) -> dict[str, str]:
        k = self.top_k
        return {"user": "[B, C] float32", "scores": f"[B, {k}] float32", "items": f"[B, {k}] int64 table ids"}

    def metadata(self, dataset) -> dict:
        """What the export's metadata adds: k and the data's raw id of each item table id."""
        return {"top_k": self.top_k, "raw_item_ids": dataset.items.vocab.tolist()}

    def summary(self) -> str:
        return f"program, top {self.top_k} of {self.corpus_ids.numel()} items"
