"""Sharded dynamic embeddings: hash tables keyed by raw int64 ids that grow on first sight.

Design in brief (details in each module):

- **Rows.** A physical table on a rank is ``num_buckets x bucket_size`` slots
  (:mod:`.index`); each slot holds an (id, tag) key, scores (``last_seen`` step, ``freq``
  count) and, in :class:`.table.PhysicalTable`, a float32 vector and its optimizer state.
  An id's initial vector is a hash of (table seed, id, column) mapped to a uniform value,
  computed bit-identically on CPU and GPU: it never depends on insertion order, batch order
  or the number of ranks.
- **Routing.** ``s = splitmix64(id + tag * golden)``; bits 31..0 pick the owner rank,
  bits 63..32 the bucket on it. Sorting by ``s`` (the dedupe sort) groups queries by bucket,
  so the probe kernel gives each bucket to one program: results are deterministic. Lookups dedupe, send (id, tag, count) to owners with an all-to-all, and
  receive rows with an all-to-all whose backward returns the gradients (:mod:`.exchange`).
- **Policies.** Hits first, then inserts into free slots; a full bucket evicts its lowest
  score (LRU: ``last_seen``; LFU: ``freq``) among rows not seen in the current step, or
  refuses (eviction ``none``: an error). TTL sweeps drop rows unseen for N steps. With an
  admission threshold, ids are counted in a second index and get a row only once seen T
  times; until then they read their initial value and get no update.
- **Updates.** Backward passes sum each row's gradients in one fixed order
  (:mod:`megatron_gr.ops.segment_sum`) and stash them on the owner; at the optimizer step
  the sums of several lookups are summed again, scaled like megatron's dense gradients
  (1/tokens, clipping by the joint norm) and applied by a row-sparse SGD/Adagrad/row-wise
  Adagrad/Adam (:mod:`megatron_gr.ops.sparse_optimizers`).
- **Placement.** A collection shards over one process group, the data-parallel group in
  training: each data-parallel rank owns the ids hashed to it. Tensor-parallel ranks of a
  replica hold identical shards (same ids, same gradients, same updates), like the
  replicated dense table; pipeline stages other than the one holding the table have none.
- **Checkpoints.** Compact per-rank files restored by re-routing every row, so any number
  of ranks loads any other's save; incremental dumps carry changed rows and removed ids
  (:mod:`.checkpoint`).
"""

from megatron_gr.embeddings.dynamic.checkpoint import collections_of, dump, load_collection, load_dumps, save_collection
from megatron_gr.embeddings.dynamic.collection import DynamicEmbeddingCollection, JaggedIds
from megatron_gr.embeddings.dynamic.embedding import DynamicEmbedding
from megatron_gr.embeddings.dynamic.table import COUNTERS, FeatureSpec, PhysicalTable

__all__ = [
    "COUNTERS",
    "DynamicEmbedding",
    "DynamicEmbeddingCollection",
    "FeatureSpec",
    "JaggedIds",
    "PhysicalTable",
    "collections_of",
    "dump",
    "load_collection",
    "load_dumps",
    "save_collection",
]
