"""Several dynamic tables behind one module: coalescing into physical tables, jagged
feature inputs, pooled and unpooled outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.config.errors import ConfigError
from megatron_gr.embeddings.dynamic.exchange import sharded_lookup
from megatron_gr.embeddings.dynamic.state import export_state, restore_state
from megatron_gr.embeddings.dynamic.table import FeatureSpec, PhysicalTable
from megatron_gr.ops.backend import KernelBackend


@dataclass
class JaggedIds:
    """The ids of one feature for a batch of bags (KeyedJaggedTensor-style, one key)::

        values  = [a0 a1 | b0 | | c0 c1 c2]   # [N] int64 raw ids
        offsets = [0, 2, 3, 3, 6]             # [B + 1]; bag 2 is empty
    """

    values: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_bags(self) -> int:
        return self.offsets.numel() - 1


def check_ids(name: str, ids: torch.Tensor) -> None:
    if ids.dtype != torch.int64:
        raise TypeError(
            f"dynamic table '{name}' takes int64 ids, got {ids.dtype}: raw ids can be any 64-bit "
            "value, convert them with ids.to(torch.int64) (a narrower type may have wrapped them already)"
        )


def _physical_groups(tables: Mapping[str, EmbeddingTableConfig]) -> dict[str, list[str]]:
    """Physical table name -> its logical tables, in config order; checks coalesced groups
    agree on everything they share."""
    groups: dict[str, list[str]] = {}
    for name, table in tables.items():
        if table.type != "dynamic":
            raise ConfigError(f"embeddings.{name}.type={table.type!r}: only dynamic tables go into a dynamic collection")
        groups.setdefault(table.dynamic.group or name, []).append(name)
    for name, table in tables.items():
        if table.dynamic.group is None and len(groups[name]) > 1:
            raise ConfigError(
                f"embeddings.{name} has no group, but other tables name {name!r} as their group: "
                f"give embeddings.{name}.dynamic.group={name!r} to coalesce it with them, or rename the group"
            )
    for group, names in groups.items():
        first = tables[names[0]]
        for other in names[1:]:
            table = tables[other]
            if table.dim != first.dim:
                raise ConfigError(
                    f"embeddings.{other}.dim={table.dim} differs from embeddings.{names[0]}.dim={first.dim}, "
                    f"but both are coalesced into group {group!r}: tables sharing a physical table need one dim"
                )
            mine, theirs = table.dynamic.physical_settings(), first.dynamic.physical_settings()
            for key in mine:
                if mine[key] != theirs[key]:
                    raise ConfigError(
                        f"embeddings.{other}.dynamic.{key}={mine[key]!r} differs from "
                        f"embeddings.{names[0]}.dynamic.{key}={theirs[key]!r}, but both are coalesced "
                        f"into group {group!r}: set the same value on every table of the group"
                    )
    return groups


class DynamicEmbeddingCollection(torch.nn.Module):
    """Dynamic tables, each possibly coalesced with others into one physical table.

    Every rank of ``group`` holds the shard of each physical table it owns by id hash, and
    every lookup is collective over ``group``.
    """

    def __init__(
        self,
        tables: Mapping[str, EmbeddingTableConfig],
        *,
        default_seed: int,
        device: torch.device,
        group: Optional[dist.ProcessGroup] = None,
        backend: KernelBackend = KernelBackend.PYTORCH,
    ):
        super().__init__()
        self.group = group
        self.tables: dict[str, PhysicalTable] = {}
        self.features: dict[str, tuple[str, FeatureSpec]] = {}
        for physical, names in sorted(_physical_groups(tables).items()):
            specs = []
            for tag, name in enumerate(names):
                config = tables[name]
                seed = config.dynamic.seed if config.dynamic.seed is not None else default_seed
                specs.append(FeatureSpec(name, tag, seed, config.init_std, config.dynamic.pooling))
                self.features[name] = (physical, specs[-1])
            first = tables[names[0]]
            self.tables[physical] = PhysicalTable(physical, first.dim, first.dynamic, specs, device, backend)

    def dim(self, feature: str) -> int:
        return self.tables[self.features[feature][0]].dim

    @property
    def _train(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def lookup(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, D]`` float32 of one feature's ids ``[N]`` (no pooling)."""
        check_ids(feature, ids)
        physical, spec = self.features[feature]
        table = self.tables[physical]
        tags = torch.full((ids.numel(),), spec.tag, dtype=torch.int32, device=ids.device) if table.coalesced else None
        return sharded_lookup(table, ids.reshape(-1), tags, group=self.group, train=self._train)

    def forward(self, features: Mapping[str, JaggedIds]) -> dict[str, torch.Tensor]:
        """Every feature's output: ``[N, D]`` rows (pooling ``none``) or ``[B, D]`` bags
        (``sum``, ``mean``; an empty bag is zeros). One exchange per physical table.

        Every rank must pass the same feature names (their ids may differ)."""
        for name, jagged in features.items():
            if name not in self.features:
                raise KeyError(f"unknown feature {name!r}; this collection has {sorted(self.features)}")
            check_ids(name, jagged.values)
        outputs = {}
        for physical, table in self.tables.items():
            names = [n for n, (owner, _) in self.features.items() if owner == physical and n in features]
            if not names:
                continue
            values = [features[n].values.reshape(-1) for n in names]
            tags = torch.cat([
                torch.full((v.numel(),), self.features[n][1].tag, dtype=torch.int32, device=v.device) for n, v in zip(names, values)
            ])
            rows = sharded_lookup(table, torch.cat(values), tags if table.coalesced else None, group=self.group, train=self._train)
            for name, part in zip(names, rows.split([v.numel() for v in values])):
                outputs[name] = _pool(part, features[name].offsets, self.features[name][1].pooling)
        return outputs

    # The tables' content is part of ``state_dict()`` (a rank's own shard), so an in-memory
    # copy of the model's weights carries it; training checkpoints save it in their own
    # files (see ``checkpoint.py``) and a state dict without it leaves the tables as they are.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, table in self.tables.items():
            for key, value in _flatten(export_state(table)).items():
                destination[f"{prefix}{name}.{key}"] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # No parameters or buffers of its own: every key under the prefix is a table's.
        rank, world = (dist.get_rank(self.group), dist.get_world_size(self.group)) if dist.is_initialized() else (0, 1)
        for name, table in self.tables.items():
            head = f"{prefix}{name}."
            entries = {key[len(head):]: value for key, value in state_dict.items() if key.startswith(head)}
            if entries:
                restore_state(table, [_unflatten(entries)], rank=rank, world=world)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {table.capacity} slots x {table.dim}" for name, table in self.tables.items())


def _pool(rows: torch.Tensor, offsets: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "none":
        return rows
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths)
    pooled = rows.new_zeros(lengths.numel(), rows.shape[1]).index_add(0, bags, rows)
    if pooling == "mean":
        pooled = pooled / lengths.clamp(min=1).to(rows.dtype)[:, None]
    return pooled


def _flatten(state: dict) -> dict[str, torch.Tensor]:
    """``{"step": 3, "rows": {"keys": t}}`` -> ``{"step": tensor(3), "rows.keys": t}``."""
    out = {"step": torch.tensor(state["step"], dtype=torch.int64)}
    for section, fields in state.items():
        if section != "step":
            out.update({f"{section}.{name}": value for name, value in fields.items()})
    return out


def _unflatten(entries: dict[str, torch.Tensor]) -> dict:
    state: dict = {"step": int(entries["step"])}
    for key, value in entries.items():
        if key != "step":
            section, name = key.split(".", 1)
            state.setdefault(section, {})[name] = value
    return state
