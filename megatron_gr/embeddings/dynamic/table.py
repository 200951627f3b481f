"""One physical hash table on one rank: the slots, the rows behind them, admission
counters, the gradients of the current step and the sparse optimizer.

Everything here is local to the rank that owns the ids; routing and all-to-all live in
:mod:`megatron_gr.embeddings.dynamic.exchange`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.embeddings.dynamic.index import HashIndex
from megatron_gr.ops import hash_table
from megatron_gr.ops.backend import KernelBackend, require_backend
from megatron_gr.ops.pytorch.hash_probe import HIT, INSERTED, NO_ROOM, NOT_STORED, REPLACED
from megatron_gr.ops.pytorch.id_hash import init_scale, row_salt
from megatron_gr.ops.pytorch.sparse_optimizers import OPTIMIZER_STATES
from megatron_gr.ops.segment_sum import segment_sum, sorted_groups
from megatron_gr.ops.sparse_optimizers import sparse_update

COUNTERS = ("lookups", "hits", "misses", "inserts", "evictions", "expired", "rejected_admission", "rejected_full")
STATISTICS = (*COUNTERS, "occupancy")  # what counter_values holds: the counters and the stored rows
# Which counters a query of each probe status adds to (rows: HIT, INSERTED, REPLACED,
# NOT_STORED, NO_ROOM), so counting is two device ops and no host round trip.
_COUNTED = {
    HIT: ("lookups", "hits"),
    INSERTED: ("lookups", "misses", "inserts"),
    REPLACED: ("lookups", "misses", "inserts", "evictions"),
    NOT_STORED: ("lookups", "misses", "rejected_admission"),
    NO_ROOM: ("lookups", "misses", "rejected_full"),
}


@dataclass(frozen=True)
class FeatureSpec:
    """A logical table inside a physical one."""

    name: str
    tag: int  # its index in the physical table's feature list
    seed: int
    init_std: float
    pooling: str = "none"


class PhysicalTable:
    """Rows of the ids this rank owns, for every logical table coalesced into it.

    ``settings`` are the shared storage/policy/optimizer settings; ``features`` the logical
    tables (their tag is their position). ``step`` counts completed optimizer steps: lookups
    of step t record ``last_seen = t``, which also protects the row from eviction until the
    step's update is applied.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        settings: DynamicTableConfig,
        features: list[FeatureSpec],
        device: torch.device,
        backend: KernelBackend = KernelBackend.PYTORCH,
    ):
        self.name = name
        self.dim = dim
        self.settings = settings
        self.features = features
        self.device = device
        self.kernel = require_backend(backend, device, what=f"dynamic table {name!r}")
        self.index = HashIndex(settings.num_buckets, settings.bucket_size, policy=settings.eviction, kernel=self.kernel, device=device)
        self.admission: Optional[HashIndex] = None
        if settings.admission_threshold > 1:
            counters = settings.admission_capacity or settings.capacity
            buckets = -(-counters // settings.bucket_size)
            self.admission = HashIndex(buckets, settings.bucket_size, policy="lfu", kernel=self.kernel, device=device)
        capacity = self.index.capacity
        self.weights = torch.zeros(capacity, dim, dtype=torch.float32, device=device)
        self.state_names = [name for name, _ in OPTIMIZER_STATES[settings.optimizer]]
        self._states = [
            torch.zeros((capacity, dim) if shape == "row" else (capacity,), dtype=torch.float32, device=device)
            for _, shape in OPTIMIZER_STATES[settings.optimizer]
        ]
        accumulator = settings.initial_accumulator if settings.optimizer in ("adagrad", "rowwise_adagrad") else 0.0
        self.state_init = [accumulator] * len(self._states)
        # 1: the row's optimizer state is state_init, whatever its memory holds. New rows get
        # the flag instead of a written state; their first update reads no state and clears it.
        self._fresh = torch.zeros(capacity, dtype=torch.uint8, device=device) if self._states else None
        self.salts = torch.tensor([row_salt(f.seed) for f in features], dtype=torch.int64, device=device)
        self.scales = torch.tensor([init_scale(f.init_std) for f in features], dtype=torch.float32, device=device)
        self.step = 0
        self.counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        self._counted = torch.tensor(
            [[name in _COUNTED[status] for name in COUNTERS] for status in sorted(_COUNTED)], dtype=torch.int64, device=device
        )
        self._statuses = torch.tensor(sorted(_COUNTED), dtype=torch.int8, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scale: Optional[torch.Tensor] = None  # the gradients' factor, on the device (None: 1)
        self._ready: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # Ids removed since the last dump (evicted or expired), kept once dumps are taken.
        self.track_removals = False
        self.removed: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def states(self) -> list[torch.Tensor]:
        """The optimizer state tensors ``[C, D]`` or ``[C]``, every row holding its value: rows
        still flagged fresh get ``state_init`` written first (a host read; for checkpoints
        and inspection, not the training step)."""
        if self._fresh is not None:
            slots = torch.nonzero(self._fresh).squeeze(1)
            for state, value in zip(self._states, self.state_init):
                state.index_fill_(0, slots, value)
            self._fresh.zero_()
        return self._states

    @property
    def coalesced(self) -> bool:
        return len(self.features) > 1

    @property
    def capacity(self) -> int:
        return self.index.capacity

    # ------------------------------------------------------------- lookups
    @property
    def counts_on_device(self) -> bool:
        """Whether a lookup may leave the number of distinct queries on the device (padded
        queries, ``find(valid=...)``): not with admission, whose filtering reads the host."""
        return self.admission is None

    def find(
        self, ids: torch.Tensor, tags: torch.Tensor, hashes: torch.Tensor, counts: torch.Tensor, *, train: bool,
        valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Slots ``[U]`` (-1: no stored row) of distinct owned queries sorted by routing key.
        ``train``: insert missing ids (subject to admission), give the new rows their initial
        value and flag their optimizer state fresh, update scores and count; otherwise read
        only. ``valid``: the number of queries as a device scalar, the entries past it
        padding (slot -1, nothing inserted or counted; needs :attr:`counts_on_device`)."""
        if not train:
            nothing = torch.zeros_like(ids, dtype=torch.bool)
            return self.index.probe(ids, tags, hashes, counts, nothing, step=self.step, update_scores=False, valid=valid).slots
        if self.admission is None:
            result = self.index.probe(
                ids, tags, hashes, counts, torch.ones_like(ids, dtype=torch.bool), step=self.step, update_scores=True,
                valid=valid,
            )
        else:
            if valid is not None:
                raise ValueError("a table with admission counting needs its query count on the host (counts_on_device)")
            result = self._probe_with_admission(ids, tags, hashes, counts)
        hash_table.init_rows(
            self.weights, self._fresh, result.slots, result.status, ids, tags, self.salts, self.scales, kernel=self.kernel
        )
        self._count(result)
        return result.slots

    def read(self, slots: torch.Tensor, ids: torch.Tensor, tags: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``[U, D]`` of the queries :meth:`find` answered with ``slots`` (the stored row,
        or the initial value where the slot is -1); with ``index`` ``[N]``, the rows of
        queries ``index``, read straight from the table."""
        return hash_table.read_rows(self.weights, slots, ids, tags, self.salts, self.scales, index=index, kernel=self.kernel)

    def _probe_with_admission(self, ids, tags, hashes, counts):
        result = self.index.probe(ids, tags, hashes, counts, torch.zeros_like(ids, dtype=torch.bool), step=self.step, update_scores=True)
        waiting = torch.nonzero(result.status != HIT).squeeze(1)
        if waiting.numel() == 0:
            return result
        seen = self.admission.probe(
            ids[waiting], tags[waiting], hashes[waiting], counts[waiting], torch.ones_like(waiting, dtype=torch.bool),
            step=self.step, update_scores=True,
        )
        totals = torch.where(seen.slots >= 0, self.admission.freq[seen.slots.clamp(min=0)], counts[waiting])
        admitted = totals >= self.settings.admission_threshold
        chosen = waiting[admitted]
        inserted = self.index.probe(
            ids[chosen], tags[chosen], hashes[chosen], totals[admitted], torch.ones_like(chosen, dtype=torch.bool),
            step=self.step, update_scores=True,
        )
        for field in ("slots", "status", "evicted_keys", "evicted_tags"):
            getattr(result, field)[chosen] = getattr(inserted, field)
        counted = seen.slots[admitted]
        self.admission.release(counted[counted >= 0])  # admitted ids stop being counted
        return result

    def _count(self, result) -> None:
        by_status = (result.status[:, None] == self._statuses).sum(dim=0)  # [5], no host read
        self.counters += (by_status[:, None] * self._counted).sum(dim=0)
        # The one host read of a training lookup besides the dedupe's, and only with eviction
        # none: a full bucket there is an error, reported at the lookup that hit it.
        if self.settings.eviction == "none" and bool(by_status[NO_ROOM] > 0):
            raise RuntimeError(self._full_message(result))
        if self.track_removals:
            gone = result.status == REPLACED
            self.removed.append((result.evicted_keys[gone], result.evicted_tags[gone]))

    def _full_message(self, result) -> str:
        stored = int(self.index.occupancy())
        names = ", ".join(f.name for f in self.features)
        return (
            f"dynamic embedding table '{self.name}' ({names}) is full and eviction is disabled: "
            f"{int((result.status == NO_ROOM).sum())} new ids found their bucket's "
            f"{self.settings.bucket_size} slots taken (the table holds {stored} of {self.capacity} rows "
            f"on this rank, load factor {stored / self.capacity:.2f}). Raise "
            f"embeddings.<table>.dynamic.capacity or set dynamic.eviction to lru or lfu"
        )

    # ----------------------------------------------------------- gradients
    def accumulate(self, slots: torch.Tensor, grads: torch.Tensor) -> None:
        """Gradients ``[U, D]`` of rows ``slots`` from one lookup's backward. Ids without a
        stored row (slot -1) keep their place here (no copy) and get no update."""
        self._pending.append((slots, grads.to(torch.float32)))

    def scale_gradients(self, factor: Union[float, torch.Tensor]) -> None:
        """Multiplies this step's row gradients by ``factor`` (a number, or a one-element
        device tensor that is never read on the host: the factors multiply on the device)."""
        if self._scale is None:
            self._scale = torch.ones((), dtype=torch.float64, device=self.device)
        self._scale = self._scale * (factor.reshape(()).double() if torch.is_tensor(factor) else factor)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's gradient per touched row: repeated rows summed (slot -1, if present,
        collects the gradients that update nothing)."""
        if self._ready is None:
            if not self._pending:
                slots = torch.zeros(0, dtype=torch.int64, device=self.device)
                grads = torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
            elif len(self._pending) == 1:  # one lookup: its slots are distinct already
                slots, grads = self._pending[0]
            else:  # several lookups: sum each row's gradients, in a fixed order
                all_slots = torch.cat([s for s, _ in self._pending])
                # No host read: the groups stay padded to the lookups' total, the padding
                # slot -1 (no update).
                groups = sorted_groups(all_slots, kernel=self.kernel, count_on_host=False)
                real = torch.arange(all_slots.numel(), device=all_slots.device) < groups.valid
                slots = torch.where(real, groups.unique, -1)
                grads = segment_sum(torch.cat([g for _, g in self._pending]), groups, kernel=self.kernel)
            self._ready = (slots, grads)
            self._pending = []
        return self._ready

    def gradient_square_sum(self) -> torch.Tensor:
        """Sum of squared (scaled) row gradients of this step, a float64 device scalar: this
        rank's share of the gradient norm."""
        slots, grads = self._gathered()
        square = (grads.double().square().sum(dim=1) * (slots >= 0)).sum()
        return square if self._scale is None else square * self._scale.square()

    def apply_step(self, dense_lr: float, *, skip: Optional[torch.Tensor] = None) -> None:
        """The sparse optimizer on this step's touched rows, then the step count advances
        and, when due, rows past their TTL are dropped. ``skip`` (a 0-dim device tensor, 1
        = skip): the step's verdict, still on the device; a skipped update moves no row and
        no state, and the caller takes the count back with :meth:`undo_step` once it reads
        the verdict (before the next update)."""
        slots, grads = self._gathered()
        settings = self.settings
        lr = settings.lr if settings.lr is not None else dense_lr
        sparse_update(
            self.weights, self._states, slots, grads, optimizer=settings.optimizer, lr=lr, step=self.step + 1,
            beta1=settings.beta1, beta2=settings.beta2, eps=settings.eps,
            grad_scale=1.0 if self._scale is None else self._scale.float(), skip=skip,
            fresh=self._fresh, state_init=self.state_init, kernel=self.kernel,
        )
        self.index.mark_changed(slots)
        self._reset_gradients()
        self.step += 1
        if settings.ttl_steps and self.step % settings.ttl_sweep_interval == 0:
            self.sweep_expired(unless=skip)  # a skipped step drops nothing (its count is taken back)

    def undo_step(self) -> None:
        """Takes back the step count of an update the device skipped (:meth:`apply_step`
        with ``skip``): Adam's bias correction counts the updates made."""
        self.step -= 1

    def discard_step(self) -> None:
        """A skipped step (non-finite gradients): the gradients are dropped, nothing moves."""
        self._reset_gradients()

    def _reset_gradients(self) -> None:
        self._pending = []
        self._ready = None
        self._scale = None

    def sweep_expired(self, *, unless: Optional[torch.Tensor] = None) -> int:
        """Drops rows (and admission counters) not seen for ``ttl_steps`` steps; nothing
        where the 0-dim device flag ``unless`` is nonzero."""
        ttl = self.settings.ttl_steps
        slots = self.index.expired(self.step, ttl, unless=unless)
        if self.track_removals and slots.numel():
            self.removed.append((self.index.keys[slots].clone(), self.index.tags[slots].clone()))
        self.index.release(slots)
        if self.admission is not None:
            self.admission.release(self.admission.expired(self.step, ttl, unless=unless))
        self.counters[COUNTERS.index("expired")] += slots.numel()
        return slots.numel()

    # ------------------------------------------------------------- reports
    def statistics(self) -> dict[str, float]:
        """Counters since the start of the run (or the last checkpoint load) and the fill."""
        values = dict(zip(STATISTICS, self.counter_values().tolist()))
        values["load_factor"] = values["occupancy"] / self.capacity
        return values

    def counter_values(self, *, occupancy: bool = True) -> torch.Tensor:
        """:data:`STATISTICS` now, a float64 device tensor (no host read: a snapshot to read
        later). ``occupancy=False``: -1 in its place (counting the stored rows reads the whole
        index, which a step should not pay for when nothing logs it)."""
        stored = self.index.occupancy().reshape(1) if occupancy else torch.full_like(self.counters[:1], -1)
        return torch.cat([self.counters, stored]).double()
