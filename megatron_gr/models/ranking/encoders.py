"""DLRM-HSTU input encoders: each turns one kind of input into token features.

- :class:`SimpleMLP`: ``Linear -> LayerNorm -> SiLU -> Linear``, the projection every
  encoder ends with (the norm puts contents and actions on the scale of the encodings from
  the first step, whatever the tables' initial spread).
- :class:`ActionEncoder`: an action bitmask (and watch time) -> the sum of one learned
  embedding per set bit (and per watch-time threshold reached).
- :class:`ContentEncoder`: history and candidate feature embeddings -> contents of one
  width (``slice``: as they are; ``mlp``: one MLP for each side).
- :class:`PositionTimeEncoder`: bucketed position (events back from the query) and time gap
  to the query -> a learned vector each, summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_gr.config.ranking_config import ActionEncoderConfig, ContentEncoderConfig
from megatron_gr.ops.time_buckets import bucketize_time_gaps


class SimpleMLP(torch.nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.norm(self.fc1(x))))


class ActionEncoder(torch.nn.Module):
    """``[H]`` bitmasks (+ ``[H]`` watch times) -> ``[H, dim]``.

    Row k of ``embeddings`` belongs to ``action_weights[k]``, then one row per watch-time
    threshold; an event's embedding is the sum of the rows its bits (and its watch time)
    switch on. Candidates, whose actions are what the model predicts, get one learned
    ``candidate_embedding`` instead.
    """

    def __init__(self, config: ActionEncoderConfig, *, init_std: float):
        super().__init__()
        self.register_buffer("action_weights", torch.tensor(config.action_weights, dtype=torch.int64), persistent=False)
        self.register_buffer(
            "watchtime_thresholds", torch.tensor(config.watchtime_thresholds, dtype=torch.float32), persistent=False
        )
        rows = len(config.action_weights) + len(config.watchtime_thresholds)
        self.embeddings = torch.nn.Parameter(torch.empty(rows, config.dim))
        self.candidate_embedding = torch.nn.Parameter(torch.empty(config.dim))
        with torch.no_grad():
            torch.nn.init.normal_(self.embeddings, std=init_std)
            torch.nn.init.normal_(self.candidate_embedding, std=init_std)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def switches(self, actions: torch.Tensor, watchtimes: torch.Tensor) -> torch.Tensor:
        """``[H, rows]`` 1.0 where an event switches a row on."""
        bits = (actions.unsqueeze(1) & self.action_weights) != 0
        reached = watchtimes.unsqueeze(1) >= self.watchtime_thresholds
        return torch.cat([bits, reached], dim=1).to(self.embeddings.dtype)

    def forward(self, actions: torch.Tensor, watchtimes: torch.Tensor) -> torch.Tensor:
        return self.switches(actions, watchtimes) @ self.embeddings


class ContentEncoder(torch.nn.Module):
    """History contents ``[H, D_uih]`` and candidate contents ``[N, D_cand]`` -> one width."""

    def __init__(self, config: ContentEncoderConfig, *, history_width: int, candidate_width: int):
        super().__init__()
        self.kind = config.type
        if self.kind == "mlp":
            self.history_mlp = SimpleMLP(history_width, config.mlp_hidden, config.dim)
            self.candidate_mlp = SimpleMLP(candidate_width, config.mlp_hidden, config.dim)
            self.dim = config.dim
        else:
            if history_width != candidate_width:
                raise ValueError(f"slice contents must be equally wide, got {history_width} and {candidate_width}")
            self.dim = history_width

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "mlp":
            return self.history_mlp(history), self.candidate_mlp(candidates)
        return history, candidates


class PositionTimeEncoder(torch.nn.Module):
    """``position_embedding[min(position, P - 1)] + time_embedding[bucket(gap)]``."""

    def __init__(self, *, num_position_buckets: int, num_time_buckets: int, time_bucket_fn: str, width: int, init_std: float):
        super().__init__()
        self.position_embedding = torch.nn.Embedding(num_position_buckets, width)
        self.time_embedding = torch.nn.Embedding(num_time_buckets, width)
        self.time_bucket_fn = time_bucket_fn
        with torch.no_grad():
            torch.nn.init.normal_(self.position_embedding.weight, std=init_std)
            torch.nn.init.normal_(self.time_embedding.weight, std=init_std)

    def buckets(self, positions: torch.Tensor, gaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position = positions.clamp(min=0, max=self.position_embedding.num_embeddings - 1)
        time = bucketize_time_gaps(gaps, self.time_embedding.num_embeddings, self.time_bucket_fn)
        return position, time

    def forward(self, positions: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        position, time = self.buckets(positions, gaps)
        return self.position_embedding(position) + self.time_embedding(time)
