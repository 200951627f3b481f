"""Runs training scenarios on any parallel layout and records what a single rank would see:
losses, gradient norms, every parameter's full gradient per step (tensor-parallel slices
joined, pipeline stages merged, data- and context-parallel shards of the distributed
optimizer gathered), full weights, the rows of dynamic item tables (data- and
context-parallel shards joined), evaluation metrics. Used in-process for single-rank
references and, through :func:`run_plan`, on several ranks (``tests/unit/parallel/layouts.py``).

A scenario is a dict; its phases run in this order, each optional::

    {"name": "tp2", "config": {section: {key: value}},
     "steps": 3,          # train (with checkpoint.load set, after resuming)
     "evaluate": True,    # validation metrics
     "save": True,        # a checkpoint into checkpoint.save
     "steps_after": 2}    # train on

``config`` is passed to ``ExperimentConfig.from_dict``. Rank 0 returns the record
(``params``/``rows``: weights and dynamic-table rows after the first phase,
``final_params``/``final_rows``: at the end); the others return None.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.dist_checkpointing.dict_utils import nested_values

from megatron_gr.config import ExperimentConfig
from megatron_gr.embeddings.dynamic.state import export_state
from megatron_gr.training.model_setup import unwrap, updated_weights
from megatron_gr.training.trainer import Trainer


def run_plan(plan: list[dict]) -> dict:
    """Every scenario of the plan in order, in this process group (started by the
    multi-rank harness): ``{name: record}``, the records being None except on rank 0."""
    return {scenario["name"]: run_scenario(scenario) for scenario in plan}


def run_scenario(scenario: dict) -> Optional[dict]:
    config = ExperimentConfig.from_dict(scenario["config"])
    trainer = Trainer(config)
    model_config = trainer.model[0].config
    captured: list[dict] = []
    finalize = model_config.finalize_model_grads_func

    def finalize_and_capture(*args, **kwargs):
        finalize(*args, **kwargs)
        captured.append(_full_tensors(trainer.model, _reduced_grads(trainer.model)))

    model_config.finalize_model_grads_func = finalize_and_capture
    record = {"losses": [], "grad_norms": [], "grads": captured, "start_iteration": trainer.state.iteration}
    for _ in range(scenario.get("steps", 0)):
        _step(trainer, record)
    record["params"] = _full_tensors(trainer.model, _weights(trainer.model))
    record["rows"] = _dynamic_rows(trainer)
    if scenario.get("evaluate"):
        record["valid"] = trainer.evaluate("valid")
    if scenario.get("save"):
        trainer.save()
    for _ in range(scenario.get("steps_after", 0)):
        _step(trainer, record)
    record["final_params"] = _full_tensors(trainer.model, _weights(trainer.model))
    record["final_rows"] = _dynamic_rows(trainer)
    record["layout"] = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "distributed_optimizer": trainer.model[0].ddp_config.use_distributed_optimizer,
        "overlap_grad_reduce": trainer.model[0].ddp_config.overlap_grad_reduce,
        "overlap_param_gather": trainer.model[0].ddp_config.overlap_param_gather,
        "buckets": sum(len(buffer.buckets) for chunk in trainer.model for buffer in chunk.buffers),
        "dropout": {"hidden": model_config.hidden_dropout, "embedding": model_config.embedding_dropout},
        "micro_batch_balance": config.parallel.balance_for(parallel_state.get_data_parallel_world_size()),
    }
    model_config.finalize_model_grads_func = finalize
    return record if dist.get_rank() == 0 else None


def _step(trainer: Trainer, record: dict) -> None:
    result = trainer.train_step()
    trainer.state.iteration += 1
    record["losses"].append(result["loss"])
    record["grad_norms"].append(result["grad_norm"])


def _weights(model_chunks) -> dict:
    with updated_weights(model_chunks):
        return {p: p.detach().clone() for chunk in model_chunks for p in chunk.parameters()}


def _dynamic_rows(trainer: Trainer) -> Optional[dict]:
    """``{table: {raw id: row}}`` on rank 0, every data-parallel shard of each dynamic table
    joined (a row lives on one data-parallel rank); tensor-parallel copies must hold the same
    ids and equal rows, their largest difference is reported under ``"replica_max_diff"``."""
    local = {table.name: export_state(table)["rows"] for table in trainer.sparse.tables}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((parallel_state.get_tensor_model_parallel_rank(), local), gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    tables, copies, worst = {}, {}, 0.0
    for tp_rank, shards in sorted(gathered, key=lambda entry: entry[0]):  # main copies (tp rank 0) first
        for name, rows in shards.items():
            for key, row in zip(rows["keys"].tolist(), rows["weights"]):
                if tp_rank == 0:
                    assert key not in tables.setdefault(name, {}), f"id {key} of {name} is stored on two data-parallel ranks"
                    tables[name][key] = row
                else:
                    copies.setdefault((tp_rank, name), set()).add(key)
                    worst = max(worst, float((tables[name][key] - row).abs().max()))
    for (tp_rank, name), keys in copies.items():
        assert keys == set(tables[name]), f"tensor-parallel rank {tp_rank} stores other ids of {name} than rank 0"
    return {**tables, "replica_max_diff": worst}


def _reduced_grads(model_chunks) -> dict:
    """Every parameter's gradient as the optimizer sees it. The distributed optimizer leaves
    each data- and context-parallel rank only its shard of every bucket: gather the shards."""
    grads = {}
    for chunk in model_chunks:
        sharded = chunk.ddp_config.use_distributed_optimizer
        for buffer in chunk.buffers:
            data = buffer.grad_data.clone()
            if sharded:
                group = parallel_state.get_data_parallel_group(with_context_parallel=True)
                for bucket in buffer.buckets:
                    shard = bucket.grad_data.view(group.size(), -1)[group.rank()].clone()
                    dist.all_gather_into_tensor(data[bucket.offset : bucket.offset + bucket.grad_data.numel()], shard, group=group)
            for param, (start, end, _) in buffer.param_index_map.items():
                grads[param] = data[start:end].view(param.shape).clone()
    return grads


def _full_tensors(model_chunks, values: dict) -> Optional[dict]:
    """``{checkpoint key: full tensor}`` on rank 0 from ``values[param]`` on every rank,
    placed by the model's sharded state dict. Each replica (tensor-parallel copies of
    replicated weights, the last stage's item table, data-parallel copies) must equal the
    main copy; the largest difference is reported under ``"replica_max_diff"``."""
    pieces = []
    state, _ = extract_sharded_tensors_and_factories(unwrap(model_chunks[0]).sharded_state_dict())
    for sh in nested_values(state):
        assert isinstance(sh, ShardedTensor) and sh.flattened_range is None
        if sh.data not in values:
            continue
        main = all(r == 0 for r in (sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)))
        pieces.append((sh.key, sh.global_shape, sh.global_offset, sh.prepend_axis_num, values[sh.data].float().cpu(), main))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    full, filled, worst = {}, set(), 0.0
    entries = sorted((p for rank_pieces in gathered for p in rank_pieces), key=lambda p: not p[5])  # main copies first
    for key, shape, offset, prepend, data, main in entries:
        tensor = full.setdefault(key, torch.full(shape, float("nan")))
        local = data.reshape((1,) * prepend + tuple(data.shape))
        region = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        if main:
            assert (key, offset) not in filled, f"two main copies of {key} at {offset}"
            tensor[region] = local
            filled.add((key, offset))
        else:
            worst = max(worst, float((tensor[region] - local).abs().max()))
    for key, tensor in full.items():
        assert not torch.isnan(tensor).any(), f"{key} is not covered by the main copies"
    full["replica_max_diff"] = worst
    return full
