"""What DLRM-HSTU does with each candidate's output: postprocess it, run the shared fusion
MLP and one head per task, and score or train the tasks.

- :class:`LayerNormPostprocessor`: ``LayerNorm(x)``.
- :class:`TimestampLayerNormPostprocessor`: ``LayerNorm([x, cos 2 pi u_p / n_p, sin 2 pi u_p / n_p
  for each period p])`` with ``u_p = floor(ts / unit_p) mod n_p`` (hour of day, day of week).
- :class:`MultiTaskTower`: fusion MLP (Linear, SiLU, optional LayerNorm and dropout per
  layer; the Linear in FP8 with ``model.fp8``), then a linear head per task: logits for
  binary tasks, values for regressions.
  Its dropout masks are keyed by the candidates' tokens (``megatron_gr/ops/keyed_dropout.py``),
  so every parallel layout drops the elements one rank drops.
- :func:`task_losses`: per candidate the weighted sum of the task losses (BCE with logits,
  squared error), so megatron's per-token reduction normalises by candidates.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_gr.config.ranking_config import RankingConfig, TaskConfig, TowerConfig
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout
from megatron_gr.seeding import keyed_init
from megatron_gr.transformer.dropout_sites import layer_site


class LayerNormPostprocessor(torch.nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width, eps=eps)
        self.width = width

    def forward(self, hidden: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class TimestampLayerNormPostprocessor(torch.nn.Module):
    def __init__(self, width: int, eps: float, *, period_units: list[int], units_per_period: list[int]):
        super().__init__()
        self.register_buffer("period_units", torch.tensor(period_units, dtype=torch.int64), persistent=False)
        self.register_buffer("units_per_period", torch.tensor(units_per_period, dtype=torch.int64), persistent=False)
        self.width = width + 2 * len(period_units)
        self.norm = torch.nn.LayerNorm(self.width, eps=eps)

    def time_features(self, timestamps: torch.Tensor) -> torch.Tensor:
        """``[N, 2 P]``: cos and sin of the phase of each period, in float32."""
        units = torch.div(timestamps.unsqueeze(1), self.period_units, rounding_mode="floor") % self.units_per_period
        phase = units.to(torch.float32) * (2 * math.pi) / self.units_per_period.to(torch.float32)
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)

    def forward(self, hidden: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        features = self.time_features(timestamps).to(hidden.dtype)
        return self.norm(torch.cat([hidden, features], dim=1))


def build_postprocessor(ranking: RankingConfig, width: int, eps: float) -> torch.nn.Module:
    if ranking.output_postprocessor == "timestamp_layernorm":
        return TimestampLayerNormPostprocessor(
            width, eps, period_units=ranking.time_period_units, units_per_period=ranking.time_units_per_period
        )
    return LayerNormPostprocessor(width, eps)


def build_head(
    ranking: RankingConfig,
    tasks: list[TaskConfig],
    width: int,
    eps: float,
    *,
    num_layers: int,
    backend: KernelBackend,
    init_seed: Optional[int],
    linear: Callable[..., torch.nn.Module] = torch.nn.Linear,
) -> tuple[torch.nn.Module, "MultiTaskTower"]:
    """The last stage's postprocessor of the ``width``-wide candidate outputs and the
    multi-task tower after it, drawn under the key ``("ranking", "tower")`` (the same
    initial values in DLRM-HSTU and ULTRA-HSTU). ``num_layers``: the STU layers before it
    (its dropout sites follow theirs). ``linear``: the fusion layers' class (FP8 ones with
    ``model.fp8``)."""
    with keyed_init(init_seed, "ranking", "tower"):
        postprocessor = build_postprocessor(ranking, width, eps)
        tower = MultiTaskTower(ranking.tower, tasks, postprocessor.width, eps, num_layers=num_layers, backend=backend,
                               linear=linear)
    return postprocessor, tower


def tower_site(num_layers: int, index: int) -> int:
    """The dropout site of the tower's ``index``-th dropout: past every site of the
    ``num_layers`` STU layers (``megatron_gr/transformer/dropout_sites.py``)."""
    return layer_site(num_layers + 1, 0) + index


class TowerDropout(torch.nn.Module):
    """Keyed dropout of one fusion layer's output (site ``site``)."""

    def __init__(self, p: float, site: int, backend: KernelBackend):
        super().__init__()
        self.p, self.site, self.backend = p, site, backend

    def forward(self, x: torch.Tensor, keys: Optional[DropoutKeys]) -> torch.Tensor:
        keys = None if keys is None else DropoutKeys(seed=keys.seed, site=self.site, token_keys=keys.token_keys)
        return keyed_dropout(x, keys, p=self.p, training=self.training, kernel=self.backend)


class MultiTaskTower(torch.nn.Module):
    """``[N, width]`` -> ``[N, tasks]``: the fusion MLP, then one linear head per task.
    ``num_layers``: the STU layers before it (its dropout sites follow theirs)."""

    def __init__(
        self,
        config: TowerConfig,
        tasks: list[TaskConfig],
        width: int,
        eps: float,
        *,
        num_layers: int = 0,
        backend: KernelBackend = KernelBackend.PYTORCH,
        linear: Callable[[int, int], torch.nn.Module] = torch.nn.Linear,
    ):
        """``linear``: the fusion layers' ``(in, out) -> module`` (``fusion_linear.py``:
        FP8 with ``model.fp8``); the task heads are always ``torch.nn.Linear``."""
        super().__init__()
        layers: list[torch.nn.Module] = []
        for i, hidden in enumerate(config.hidden_sizes):
            layers += [linear(width, hidden), torch.nn.SiLU()]
            if config.layer_norm:
                layers.append(torch.nn.LayerNorm(hidden, eps=eps))
            if config.dropout > 0:
                layers.append(TowerDropout(config.dropout, tower_site(num_layers, i), backend))
            width = hidden
        self.fusion = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({task.name: torch.nn.Linear(width, 1) for task in tasks})

    def forward(self, x: torch.Tensor, dropout_keys: Optional[DropoutKeys] = None) -> torch.Tensor:
        """``dropout_keys``: the candidates' token keys and the step's seed (any site: each
        dropout uses its own); needed in training when the tower has dropout."""
        for layer in self.fusion:
            x = layer(x, dropout_keys) if isinstance(layer, TowerDropout) else layer(x)
        return torch.cat([head(x) for head in self.heads.values()], dim=1)


def task_losses(outputs: torch.Tensor, labels: torch.Tensor, tasks: list[TaskConfig]) -> torch.Tensor:
    """``[N]`` float32: sum over tasks of weight x (BCE with logits | squared error)."""
    outputs, labels = outputs.float(), labels.float()
    total = outputs.new_zeros(outputs.shape[0])
    for t, task in enumerate(tasks):
        if task.type == "binary":
            loss = F.binary_cross_entropy_with_logits(outputs[:, t], labels[:, t], reduction="none")
        else:
            loss = (outputs[:, t] - labels[:, t]) ** 2
        total = total + task.weight * loss
    return total


def task_scores(outputs: torch.Tensor, tasks: list[TaskConfig]) -> torch.Tensor:
    """``[N, tasks]`` float32: probabilities for binary tasks, values for regressions."""
    outputs = outputs.float()
    binary = torch.tensor([task.type == "binary" for task in tasks], device=outputs.device)
    return torch.where(binary, torch.sigmoid(outputs), outputs)
