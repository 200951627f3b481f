"""Settings of a dynamic (hash-table) embedding table (``embeddings.<name>.dynamic.<field>``).

The table holds rows for raw int64 ids, created on first sight, in a bucketed hash table of
fixed capacity on every rank; ids are routed to their owner rank by a hash. See
``megatron_gr/embeddings/dynamic/__init__.py`` for the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_gr.config.validation import check_choice, check_float_range, check_int_range, require

EVICTION_POLICIES = ("lru", "lfu", "none")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
POOLINGS = ("none", "sum", "mean")

# Fields that describe one physical table: tables coalesced into one ``group`` must agree on
# every one of them (seed, init_std and pooling stay per logical table).
PHYSICAL_FIELDS = (
    "capacity", "bucket_size", "eviction", "ttl_steps", "ttl_sweep_interval", "admission_threshold",
    "admission_capacity", "optimizer", "lr", "beta1", "beta2", "eps", "initial_accumulator",
)


@dataclass
class DynamicTableConfig:
    # ---------------- storage ----------------
    capacity: int = 262144
    """Rows one rank can hold, rounded up to whole buckets. Memory per rank is about
    ``capacity x (dim x (1 + optimizer state) x 4 + 28)`` bytes (Adam keeps two states)."""

    bucket_size: int = 64
    """Slots per hash bucket. An id lives in the bucket its hash names; when that bucket is
    full the lowest-scored row of the bucket is evicted. Larger buckets evict closer to the
    table-wide lowest score and fill the table further before evicting; smaller buckets
    probe faster."""

    group: Optional[str] = None
    """Coalescing: tables naming the same group share one physical table (ids of different
    tables never collide: a row is keyed by (table, id)). They must have the same ``dim``
    and the same storage, policy and optimizer settings. None: a table of its own."""

    # ---------------- policies ----------------
    eviction: Literal["lru", "lfu", "none"] = "lru"
    """Which row a full bucket gives up for a new id: ``lru`` the one seen longest ago,
    ``lfu`` the one seen least often (ties: the older one), ``none`` none at all (a full
    bucket is an error). Rows looked up in the current step are never evicted."""

    ttl_steps: int = 0
    """Evict rows not seen for this many optimizer steps (0 = keep them until evicted)."""

    ttl_sweep_interval: int = 100
    """Optimizer steps between two TTL sweeps."""

    admission_threshold: int = 1
    """An id gets a stored row only once it has been seen this many times (occurrences over
    all ranks); before that it reads its initial value and gets no update. 1 = admit on
    first sight."""

    admission_capacity: Optional[int] = None
    """Ids one rank counts while they wait for admission (None = ``capacity``). When full,
    the least-seen counter is dropped."""

    # ---------------- initial values ----------------
    seed: Optional[int] = None
    """Seed of the initial values: a row starts as a function of (seed, id) only (uniform
    with standard deviation ``init_std``). None = ``training.seed``."""

    # ---------------- sparse optimizer ----------------
    optimizer: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "adam"
    """Update of the rows a step touched, on the rank that owns them: ``sgd``; ``adagrad``
    (sum of squared gradients per element); ``rowwise_adagrad`` (one mean square per row);
    ``adam`` (two moments per element, bias-corrected with the table's step count)."""

    lr: Optional[float] = None
    """Learning rate of the rows; None = the dense learning rate at every step (its warm-up
    and decay)."""

    beta1: float = 0.9
    """Adam's first-moment decay."""

    beta2: float = 0.98
    """Adam's second-moment decay."""

    eps: float = 1e-8
    """Added to the denominator of Adam and both Adagrads."""

    initial_accumulator: float = 0.0
    """Starting sum of squares of both Adagrads."""

    # ---------------- outputs ----------------
    pooling: Literal["none", "sum", "mean"] = "none"
    """Output of a bag of ids (a jagged feature): ``none`` one vector per id (sequences, the
    STU input), ``sum`` or ``mean`` one vector per bag."""

    def __post_init__(self):
        check_int_range("capacity", self.capacity, low=1)
        check_int_range("bucket_size", self.bucket_size, low=1, high=1024)
        if self.group is not None:
            require(isinstance(self.group, str) and self.group != "", f"group={self.group!r} must be a non-empty name or null")
        check_choice("eviction", self.eviction, EVICTION_POLICIES)
        check_int_range("ttl_steps", self.ttl_steps, low=0)
        check_int_range("ttl_sweep_interval", self.ttl_sweep_interval, low=1)
        check_int_range("admission_threshold", self.admission_threshold, low=1)
        if self.admission_capacity is not None:
            check_int_range("admission_capacity", self.admission_capacity, low=1)
        if self.seed is not None:
            check_int_range("seed", self.seed, low=0, high=2**63 - 1)
        check_choice("optimizer", self.optimizer, SPARSE_OPTIMIZERS)
        if self.lr is not None:
            check_float_range("lr", self.lr, low=0.0, low_exclusive=True)
        check_float_range("beta1", self.beta1, low=0.0, high=1.0)
        check_float_range("beta2", self.beta2, low=0.0, high=1.0)
        check_float_range("eps", self.eps, low=0.0, low_exclusive=True)
        check_float_range("initial_accumulator", self.initial_accumulator, low=0.0)
        check_choice("pooling", self.pooling, POOLINGS)

    @property
    def num_buckets(self) -> int:
        return -(-self.capacity // self.bucket_size)

    def physical_settings(self) -> dict:
        """The settings coalesced tables must share."""
        return {name: getattr(self, name) for name in PHYSICAL_FIELDS}
