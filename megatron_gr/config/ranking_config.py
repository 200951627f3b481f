"""The ``ranking`` section: DLRM-HSTU's feature groups, input encoders, output
postprocessor, multi-task tower and tasks (``model.type: ranking``).

Feature groups carry tzrec's DlrmHSTU names. A group of embedded features maps each
feature (a column of the data) to the embedding table it is looked up in (a name under
``embeddings:``; features may share a table); the other groups name one raw column::

    ranking:
      features:
        contextual: {segment: segment, activity: activity}   # one token per feature
        uih: {item_id: item, item_topic: topic}               # history item ids (+ side features)
        uih_action: action                                    # action bitmask per event
        uih_watchtime: watch_time
        uih_timestamp: timestamp
        candidate: {cand_item_id: item, cand_item_topic: topic}  # the items to rank
        candidate_timestamp: cand_timestamp
      tasks:
        - {name: click, type: binary, label: cand_action, bitmask: 1}
        - {name: watch_time, type: regression, label: cand_watch_time, weight: 0.2}

Checks that need other sections (tables, dims, the data's columns) live in
``ranking_checks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.validation import check_choice, check_dropout, check_float_range, check_int_range, require

FEATURE_GROUPS = (
    "contextual", "uih", "uih_action", "uih_watchtime", "uih_timestamp", "candidate", "candidate_timestamp"
)
TASK_TYPES = ("binary", "regression")
CONTENT_ENCODERS = ("slice", "mlp")
OUTPUT_POSTPROCESSORS = ("layernorm", "timestamp_layernorm")


@dataclass
class FeatureGroupsConfig:
    """Which columns of the data feed the model, and through which tables. The defaults are
    the columns of the embedded synthetic data set (``data.source: synthetic``)."""

    contextual: dict[str, str] = field(default_factory=lambda: {"segment": "segment", "activity": "activity"})
    """Per-user features, ``feature: table``: each becomes one contextual token at the start
    of the user's sequence (every token sees them)."""

    uih: dict[str, str] = field(default_factory=lambda: {"item_id": "item", "item_topic": "topic"})
    """User interaction history: the item id and side features of each event, ``feature:
    table``; an event's content is its features' embeddings concatenated."""

    uih_action: Optional[str] = "action"
    """The action bitmask of each history event (bit k set: action k happened), read by the
    action encoder; null: no action encoder."""

    uih_watchtime: Optional[str] = "watch_time"
    """Watch time of each history event (seconds), turned into extra action bits by
    ``action_encoder.watchtime_thresholds``; null when the data has none."""

    uih_timestamp: str = "timestamp"
    """Time of each history event (seconds): time encodings and the relative time bias."""

    candidate: dict[str, str] = field(default_factory=lambda: {"cand_item_id": "item", "cand_item_topic": "topic"})
    """The items to rank (targets) and their side features, ``feature: table``."""

    candidate_timestamp: str = "cand_timestamp"
    """Time of each candidate impression (seconds); a user's query time is the latest."""

    channel_groups: dict[str, Union[dict[str, str], str]] = field(default_factory=dict)
    """ULTRA-HSTU channels' groups (``<name>``, ``<name>_action``, ``<name>_watchtime``,
    ``<name>_timestamp``, see ``transducer_config.py``): written in YAML beside the groups
    above, collected here when the config loads."""

    def __post_init__(self):
        for group in ("uih", "candidate"):
            require(
                len(getattr(self, group)) > 0,
                f"{group} is empty: name at least one feature and its table, e.g. {{item_id: item}}",
            )
        seen: dict[str, str] = {}
        for group, names in self.columns().items():
            for name in names:
                require(
                    name not in seen,
                    f"{group} and {seen.get(name)} both read column {name!r}: a column "
                    "feeds one group (give the candidate copy of a history feature its own column)",
                )
                seen[name] = group

    def columns(self) -> dict[str, tuple[str, ...]]:
        """Group -> the columns it reads (feature names), in config order."""
        single = ("uih_action", "uih_watchtime", "uih_timestamp", "candidate_timestamp")
        out = {group: tuple(getattr(self, group)) for group in ("contextual", "uih", "candidate")}
        out.update({group: (getattr(self, group),) for group in single if getattr(self, group) is not None})
        return out

    def channel_embedded(self) -> dict[str, dict[str, str]]:
        """The channels' history groups: group -> {feature: table}."""
        return {group: value for group, value in self.channel_groups.items() if isinstance(value, dict)}

    def embedded(self) -> dict[str, dict[str, str]]:
        """The groups whose features are looked up in tables: group -> {feature: table}."""
        return {"contextual": self.contextual, "uih": self.uih, "candidate": self.candidate}


@dataclass
class ActionEncoderConfig:
    """A learned embedding per action bit, summed over the bits an event has set."""

    action_weights: list[int] = field(default_factory=lambda: [1, 2])
    """The bit values the encoder embeds (powers of two, as tzrec's ``action_weights``): an
    event with ``bitmask & w != 0`` adds the embedding of w."""

    watchtime_thresholds: list[float] = field(default_factory=list)
    """Watch times (seconds) that add one more learned embedding each when an event's watch
    time reaches them (needs ``features.uih_watchtime``)."""

    dim: int = 16
    """Width of the action embeddings."""

    mlp_hidden: int = 64
    """Hidden width of the MLP that maps the action embedding to a token."""

    def __post_init__(self):
        require(len(self.action_weights) > 0, "action_weights is empty: list the action bits to embed")
        for i, weight in enumerate(self.action_weights):
            check_int_range(f"action_weights[{i}]", weight, low=1, high=2**62)
            require(
                weight & (weight - 1) == 0,
                f"action_weights[{i}]={weight} is not a power of two: each entry names one action bit",
            )
        require(
            len(set(self.action_weights)) == len(self.action_weights),
            f"action_weights={self.action_weights} repeats a bit: list each bit once",
        )
        for i, threshold in enumerate(self.watchtime_thresholds):
            check_float_range(f"watchtime_thresholds[{i}]", threshold, low=0.0)
        check_int_range("dim", self.dim, low=1)
        check_int_range("mlp_hidden", self.mlp_hidden, low=1)


@dataclass
class ContentEncoderConfig:
    """How history and candidate tokens get their content (their features' embeddings)."""

    type: Literal["slice", "mlp"] = "slice"
    """``slice``: a token's content is its features' embeddings concatenated, and history and
    candidate tokens must be equally wide. ``mlp``: one MLP maps history contents and one
    maps candidate contents into a space of ``dim`` (candidates may then carry other
    features, such as user-item cross features)."""

    dim: Optional[int] = None
    """Width of the shared content space (``mlp`` only)."""

    mlp_hidden: int = 64
    """Hidden width of the MLPs: the ``mlp`` encoders and the content MLP that maps a
    content to a token."""

    def __post_init__(self):
        check_choice("type", self.type, CONTENT_ENCODERS)
        check_int_range("mlp_hidden", self.mlp_hidden, low=1)
        if self.type == "mlp":
            require(self.dim is not None, "type=mlp needs dim, the width of the shared content space")
            check_int_range("dim", self.dim, low=1)
        else:
            require(
                self.dim is None,
                f"dim={self.dim} applies to type=mlp; a slice content is as wide as its features",
            )


@dataclass
class TowerConfig:
    """The per-candidate fusion MLP that all task heads share."""

    hidden_sizes: list[int] = field(default_factory=lambda: [64])
    """Widths of the fusion MLP's layers (SiLU between); empty: heads read the sequence
    output directly."""

    layer_norm: bool = True
    """Layer norm after each fusion layer."""

    dropout: float = 0.0
    """Dropout after each fusion layer; its masks are keyed by the candidates' tokens and the
    step, as the STU layers' are, so every parallel layout drops the same elements."""

    def __post_init__(self):
        for i, width in enumerate(self.hidden_sizes):
            check_int_range(f"hidden_sizes[{i}]", width, low=1)
        check_dropout("dropout", self.dropout)


@dataclass
class TaskConfig:
    """One prediction per candidate with its own head and loss."""

    name: str = ""
    """Names the task's metrics (``<name>/auc``, ...) and ``selection_task``."""

    type: Literal["binary", "regression"] = "binary"
    """``binary``: BCE with logits, label = ``label & bitmask != 0``; ``regression``: MSE on
    the label's value (watch time, rating)."""

    label: str = ""
    """The per-candidate label column (an action bitmask for binary tasks)."""

    bitmask: Optional[int] = None
    """Binary tasks: the action bits that make a positive (tzrec's ``task_bitmask``)."""

    weight: float = 1.0
    """Weight of the task's loss in the per-candidate sum."""

    def __post_init__(self):
        require(self.name != "", "name is empty: every task needs one, e.g. {name: click, type: binary, label: ..., bitmask: 1}")
        require("/" not in self.name, f"name={self.name!r} must not contain '/' (metric names use it)")
        check_choice("type", self.type, TASK_TYPES)
        require(self.label != "", f"label is empty: task {self.name!r} needs the per-candidate label column it reads")
        check_float_range("weight", self.weight, low=0.0)
        if self.type == "binary":
            require(
                self.bitmask is not None,
                f"bitmask is missing: binary task {self.name!r} needs the action bits of {self.label!r} that make a positive",
            )
            check_int_range("bitmask", self.bitmask, low=1, high=2**62)
        else:
            require(
                self.bitmask is None,
                f"bitmask={self.bitmask} applies to binary tasks only: task {self.name!r} is a regression",
            )


def _default_tasks() -> list[TaskConfig]:
    return [
        TaskConfig(name="click", type="binary", label="cand_action", bitmask=1),
        TaskConfig(name="like", type="binary", label="cand_action", bitmask=2, weight=0.5),
        TaskConfig(name="watch_time", type="regression", label="cand_watch_time", weight=0.2),
    ]


@dataclass
class RankingConfig:
    features: FeatureGroupsConfig = field(default_factory=FeatureGroupsConfig)
    """The feature groups (tzrec's DlrmHSTU names) and the table of each feature."""

    action_encoder: ActionEncoderConfig = field(default_factory=ActionEncoderConfig)
    """Action bitmask (and watch time) -> action embedding; used when ``features.uih_action``
    is set."""

    content_encoder: ContentEncoderConfig = field(default_factory=ContentEncoderConfig)
    """Feature embeddings -> token content."""

    num_position_buckets: int = 128
    """Position encoding of history tokens: events between the token and the query time
    (1 = the latest event), clipped to the last bucket; candidates are position 0."""

    output_postprocessor: Literal["layernorm", "timestamp_layernorm"] = "layernorm"
    """Candidate outputs before the tower: ``layernorm``, or ``timestamp_layernorm`` (the
    layer norm of the output with cos/sin features of the candidate's time appended:
    hour-of-day and day-of-week by default)."""

    time_period_units: list[int] = field(default_factory=lambda: [3600, 86400])
    """``timestamp_layernorm``: the unit of each periodic time feature (seconds)."""

    time_units_per_period: list[int] = field(default_factory=lambda: [24, 7])
    """``timestamp_layernorm``: units per period, one per entry of ``time_period_units``
    (the defaults: hour of day, day of week)."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    """The per-candidate fusion MLP."""

    tasks: list[TaskConfig] = field(default_factory=_default_tasks)
    """The tasks, each with a head on the fusion MLP and a weighted loss."""

    selection_task: Optional[str] = None
    """The binary task whose validation AUC selects the best weights (default: the first
    binary task)."""

    use_history: bool = True
    """False drops the history tokens: a non-sequential baseline over contextual and
    candidate features, with the same network and training."""

    def __post_init__(self):
        check_int_range("num_position_buckets", self.num_position_buckets, low=1)
        check_choice("output_postprocessor", self.output_postprocessor, OUTPUT_POSTPROCESSORS)
        self._validate_time_features()
        self._validate_tasks()

    def _validate_time_features(self) -> None:
        require(
            len(self.time_period_units) == len(self.time_units_per_period),
            f"time_period_units={self.time_period_units} and time_units_per_period={self.time_units_per_period} "
            "must have one entry each per periodic feature",
        )
        for i, (unit, count) in enumerate(zip(self.time_period_units, self.time_units_per_period)):
            check_int_range(f"time_period_units[{i}]", unit, low=1)
            check_int_range(f"time_units_per_period[{i}]", count, low=2)

    def _validate_tasks(self) -> None:
        require(len(self.tasks) > 0, "tasks is empty: give at least one binary task")
        names = [task.name for task in self.tasks]
        for name in names:
            require(names.count(name) == 1, f"tasks name {name!r} twice: task names must be unique")
        require(
            any(task.weight > 0 for task in self.tasks),
            "tasks all have weight 0: nothing would be trained; give a task a weight > 0",
        )
        binary = [task.name for task in self.tasks if task.type == "binary"]
        require(len(binary) > 0, "tasks has no binary task: the best weights are chosen by a binary task's AUC; add one")
        if self.selection_task is None:
            self.selection_task = binary[0]
        elif self.selection_task not in binary:
            raise ConfigError(
                f"selection_task={self.selection_task!r} is not a binary task; choose one of {', '.join(binary)}"
            )

    @property
    def selection_index(self) -> int:
        return [task.name for task in self.tasks].index(self.selection_task)
