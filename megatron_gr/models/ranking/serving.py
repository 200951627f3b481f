"""The serving computation of DLRM-HSTU and ULTRA-HSTU, as a plain module that
``torch.export`` traces: a jagged batch of requests (per request its contextual features,
its history in each channel and its candidates) -> every candidate's task
scores, in one pass.

It assembles the batch the ranking loader builds (``data/ranking/loader.py``
``make_batch``: per request and channel one sequence [contextual | history | candidates])
in torch, then calls the trained model's own ``forward`` in eval mode (the code
evaluation runs, not a re-implementation), so served scores are the evaluation's by
construction. Candidates are target-aware (a candidate sees the contextual tokens, the
history and itself, never another candidate), so one request may carry as many as fit
``max_seq_len`` beside its history (more: split them over requests of the same history;
a request that does not fit stops the program with one error naming max_seq_len). Only the padding width differs from evaluation (every sequence is padded to
``max_seq_len`` instead of to the batch's longest, so the program has no data-dependent
shapes), which adds exact zeros to the attention sums.

Inputs (ids are table ids: dense ids 1..n of each plain table, as the export's metadata
maps them from raw ids; B requests, N candidates, H events of a channel)::

    query_times           [B] int64           when each request is scored (seconds): the
                                              time gaps of its events and candidates
    contextual_ids        [B, contextual] int64   one column per contextual feature
    candidate_ids         [N, candidate] int64    one column per candidate feature
    candidate_timestamps  [N] int64
    candidate_offsets     [B + 1] int64       request b's candidates are rows
                                              candidate_offsets[b]:candidate_offsets[b + 1]
    histories             {channel: {"ids": [H, uih features] int64, "actions": [H] int64
                          bitmasks, "watchtimes": [H] float32, "timestamps": [H] int64,
                          "offsets": [B + 1] int64}}: DLRM-HSTU's one channel is "uih";
                          ULTRA-HSTU's are its transducers' names (actions and watch
                          times are read where the features name them)

A request's contextual tokens, history events (the latest of each channel, oldest first)
and candidates must fit ``max_seq_len`` tokens, as in training (the loader keeps the
latest events that fit). Output: ``scores`` ``[N, tasks]`` float32 (probabilities of the
binary tasks, values of the regression tasks; in ``ranking.tasks`` order).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.data.ranking.batch import RankingBatch

HISTORY_FIELDS = ("ids", "actions", "watchtimes", "timestamps", "offsets")


def _is_ultra(model) -> bool:
    return hasattr(model, "channels")


def channel_tables(model) -> dict[str, tuple[str, ...]]:
    """Channel key -> the tables of its history columns, in the model's channel order."""
    if _is_ultra(model):
        return {key: channel.preprocessor.history_tables for key, channel in model.channels.items()}
    return {"uih": model.preprocessor.history_tables}


def _preprocessor(model):
    return model.channels[next(iter(model.channels))].preprocessor if _is_ultra(model) else model.preprocessor


def assemble(
    *,
    query_times: torch.Tensor,
    contextual_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_timestamps: torch.Tensor,
    candidate_offsets: torch.Tensor,
    history: dict[str, torch.Tensor],
    num_tasks: int,
    max_len: int,
) -> RankingBatch:
    """The :class:`RankingBatch` the ranking loader builds for these requests (one channel),
    without dropout keys, labels zero, each candidate's user its request's index."""
    num_requests, num_contextual = contextual_ids.shape
    num_events, num_candidates = history["ids"].shape[0], candidate_ids.shape[0]
    requests = torch.arange(num_requests, device=query_times.device)
    hist_len = history["offsets"][1:] - history["offsets"][:-1]  # [B]
    cand_len = candidate_offsets[1:] - candidate_offsets[:-1]  # [B]
    lengths = num_contextual + hist_len + cand_len  # [B]
    # A device-side check that the exported program keeps (a shape check would be data-dependent).
    torch._assert_async(
        (lengths <= max_len).all(),
        f"a request's contextual tokens, history and candidates exceed max_seq_len={max_len}: "
        "send fewer candidates (candidates never see each other: split them over requests) or a shorter history",
    )
    offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))  # [B + 1]
    events_user = torch.repeat_interleave(requests, hist_len, output_size=num_events)  # [H]
    cands_user = torch.repeat_interleave(requests, cand_len, output_size=num_candidates)  # [N]
    within_history = torch.arange(num_events, device=offsets.device) - history["offsets"][:-1][events_user]
    within_candidates = torch.arange(num_candidates, device=offsets.device) - candidate_offsets[:-1][cands_user]
    history_index = offsets[events_user] + num_contextual + within_history
    candidate_index = offsets[cands_user] + num_contextual + hist_len[cands_user] + within_candidates
    contextual_index = (offsets[:-1, None] + torch.arange(num_contextual, device=offsets.device)[None, :]).reshape(-1)
    stamps = torch.cat([query_times.repeat_interleave(num_contextual), history["timestamps"], candidate_timestamps])
    order = torch.cat([contextual_index, history_index, candidate_index])
    token_timestamps = torch.empty_like(stamps).index_put((order,), stamps)  # [T]
    return RankingBatch(
        offsets=offsets,
        num_targets=cand_len,
        token_timestamps=token_timestamps,
        contextual_ids=contextual_ids,
        contextual_index=contextual_index,
        history_ids=history["ids"],
        history_actions=history["actions"],
        history_watchtimes=history["watchtimes"],
        history_positions=hist_len[events_user] - within_history,
        history_gaps=query_times[events_user] - history["timestamps"],
        history_index=history_index,
        candidate_ids=candidate_ids,
        candidate_timestamps=candidate_timestamps,
        candidate_gaps=query_times[cands_user] - candidate_timestamps,
        candidate_index=candidate_index,
        labels=torch.zeros(num_candidates, num_tasks, device=offsets.device),
        user_ids=cands_user,
        max_len=max_len,
    )


def _with_padding_request(tensors: dict) -> dict:
    """One more request of one event per channel and one candidate (table id 0, the
    padding row), dropped at the end: the traced program then never meets one request,
    event or candidate, sizes that torch.export specialises on. Attention stays inside
    each sequence, and candidates see no other candidate, so no request sees it."""

    def grow(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values, values.new_zeros((1, *values.shape[1:]))])

    def grow_offsets(offsets: torch.Tensor) -> torch.Tensor:
        return torch.cat([offsets, offsets[-1:] + 1])

    out = {name: grow(tensors[name]) for name in ("query_times", "contextual_ids", "candidate_ids", "candidate_timestamps")}
    out["candidate_offsets"] = grow_offsets(tensors["candidate_offsets"])
    out["histories"] = {
        key: {**{f: grow(h[f]) for f in HISTORY_FIELDS if f != "offsets"}, "offsets": grow_offsets(h["offsets"])}
        for key, h in tensors["histories"].items()
    }
    return out


class RankingServing(torch.nn.Module):
    """``forward(query_times, contextual_ids, candidate_ids, candidate_timestamps,
    candidate_offsets, histories) -> scores [N, tasks]`` (see the module docstring)."""

    def __init__(self, model, *, top_k: Optional[int] = None):
        super().__init__()
        if top_k is not None:
            raise ValueError("--top-k applies to retrieval models: a ranking program scores every candidate it is given")
        if not (model.pre_process and model.post_process) or getattr(model, "context_group", None) is not None:
            raise ValueError("serving needs the whole model on one process (tensor, pipeline and context size 1)")
        dynamic = [name for name, table in model.tables.items() if type(table).__name__ == "DynamicEmbedding"]
        if dynamic:
            raise ValueError(
                f"embeddings.{dynamic[0]}.type=dynamic: exporting a hash-table embedding is not supported yet "
                "(its lookups are not traceable); export a model with plain tables"
            )
        self.model = model.eval()
        self.ultra = _is_ultra(model)
        self.channels = channel_tables(model)
        preprocessor = _preprocessor(model)
        self.contextual_tables = preprocessor.contextual_tables
        self.candidate_tables = preprocessor.candidate_tables
        self.task_names = [task.name for task in model.tasks]
        self.max_len = model.config.max_seq_len

    def forward(
        self,
        query_times: torch.Tensor,
        contextual_ids: torch.Tensor,
        candidate_ids: torch.Tensor,
        candidate_timestamps: torch.Tensor,
        candidate_offsets: torch.Tensor,
        histories: dict[str, dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        if list(histories) != list(self.channels):
            raise ValueError(f"histories must hold the channels {list(self.channels)}, got {list(histories)}")
        num_candidates = candidate_ids.shape[0]
        padded = _with_padding_request(
            {"query_times": query_times, "contextual_ids": contextual_ids, "candidate_ids": candidate_ids,
             "candidate_timestamps": candidate_timestamps, "candidate_offsets": candidate_offsets,
             "histories": histories}
        )
        shared = {name: padded[name] for name in
                  ("query_times", "contextual_ids", "candidate_ids", "candidate_timestamps", "candidate_offsets")}
        batches = {
            key: assemble(**shared, history=padded["histories"][key], num_tasks=len(self.task_names), max_len=self.max_len)
            for key in self.channels
        }
        if self.ultra:
            from megatron_gr.data.ranking.channel_batches import ChannelBatch

            # max_candidates bounds a truncated sequence's length; max_seq_len bounds it too.
            output = self.model(ChannelBatch(batches, max_candidates=self.max_len))
        else:
            output = self.model(batches["uih"])
        return output.scores[:num_candidates].float()

    def example_inputs(self, batch) -> dict:
        """The program's inputs for the requests of an evaluation batch (a ``RankingBatch``
        or, for ULTRA-HSTU, a ``ChannelBatch``)."""
        return requests_of(batch)

    def described_inputs(self) -> dict[str, str]:
        channels = {key: f"history columns {list(tables)}" for key, tables in self.channels.items()}
        return {
            "query_times": "[B] int64 seconds",
            "contextual_ids": f"[B, {len(self.contextual_tables)}] int64 table ids of {list(self.contextual_tables)}",
            "candidate_ids": f"[N, {len(self.candidate_tables)}] int64 table ids of {list(self.candidate_tables)}",
            "candidate_timestamps": "[N] int64 seconds",
            "candidate_offsets": "[B + 1] int64",
            "histories": {key: {"ids": f"[H, {len(t)}] int64 table ids of {list(t)}", "actions": "[H] int64 bitmasks",
                                "watchtimes": "[H] float32", "timestamps": "[H] int64 seconds",
                                "offsets": "[B + 1] int64"} for key, t in self.channels.items()},
            "channels": channels,
        }

    def described_outputs(self) -> dict[str, str]:
        return {"scores": f"[N, {len(self.task_names)}] float32: tasks {self.task_names}"}

    def dynamic_shapes(self) -> dict:
        requests, candidates = torch.export.Dim("requests", min=1), torch.export.Dim("candidates", min=1)
        histories = {}
        for key in self.channels:
            events = torch.export.Dim(f"events_{key}", min=1)
            histories[key] = {"ids": {0: events}, "actions": {0: events}, "watchtimes": {0: events},
                              "timestamps": {0: events}, "offsets": {0: requests + 1}}
        return {"query_times": {0: requests}, "contextual_ids": {0: requests}, "candidate_ids": {0: candidates},
                "candidate_timestamps": {0: candidates}, "candidate_offsets": {0: requests + 1}, "histories": histories}

    def metadata(self, dataset) -> dict:
        """What the export's metadata adds: the tasks and the data's raw id of each table id
        of every table the inputs name."""
        tables = set(self.contextual_tables) | set(self.candidate_tables)
        for names in self.channels.values():
            tables |= set(names)
        spaces = {}
        for channel in getattr(dataset, "channels", {"uih": dataset}).values():
            spaces.update(channel.data.tables)
        return {"tasks": self.task_names, "raw_ids": {name: spaces[name].vocab.tolist() for name in sorted(tables)}}

    def summary(self) -> str:
        kind = f"ULTRA-HSTU ({len(self.channels)} channels)" if self.ultra else "DLRM-HSTU"
        return f"{kind} program, {len(self.task_names)} task scores per candidate"


def _owner(offsets: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The sequence of each token position ``index`` under ``offsets``."""
    return torch.searchsorted(offsets, index, right=True) - 1


def _history_request(batch: RankingBatch) -> dict[str, torch.Tensor]:
    owner = _owner(batch.offsets, batch.history_index)
    counts = torch.bincount(owner, minlength=batch.batch_size)
    return {
        "ids": batch.history_ids,
        "actions": batch.history_actions,
        "watchtimes": batch.history_watchtimes,
        "timestamps": batch.token_timestamps[batch.history_index],
        "offsets": torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)),
    }


def requests_of(batch) -> dict:
    """The serving inputs of the requests an evaluation batch holds (a ``RankingBatch``, or
    a ``ChannelBatch`` whose channels share contextual features and candidates)."""
    channels = batch.channels if hasattr(batch, "channels") else {"uih": batch}
    first = next(iter(channels.values()))
    counts = first.num_targets
    starts = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    # Every request has a candidate; its gap to the query time gives the query time.
    query = first.candidate_gaps[starts[:-1]] + first.candidate_timestamps[starts[:-1]]
    return {
        "query_times": query,
        "contextual_ids": first.contextual_ids,
        "candidate_ids": first.candidate_ids,
        "candidate_timestamps": first.candidate_timestamps,
        "candidate_offsets": starts,
        "histories": {key: _history_request(b) for key, b in channels.items()},
    }
