"""Meta generative-recommenders' HSTU retrieval state dict <-> megatron_gr's (single rank).

Their research HSTU (``generative_recommenders/research/modeling/sequential/hstu.py``)
names its tensors, for H heads, dqk/dv per head, model width D, L layers::

    _embedding_module._item_emb.weight               [items + 1, D]
    _input_features_preproc._pos_emb.weight          [N, D]
    _hstu._attention_layers.<l>._uvqk                [D, H (2 dv + 2 dqk)]  used as x @ _uvqk;
                                                     columns [u | v | q | k], each head-major
    _hstu._attention_layers.<l>._o.weight / .bias    [D, H dv] / [D]
    _hstu._attention_layers.<l>._rel_attn_bias._pos_w  [2N - 1]   bias of (i, j): _pos_w[j - i + N - 1]
    _hstu._attention_layers.<l>._rel_attn_bias._ts_w   [buckets + 1]
    _attn_mask                                       [N, N] bool (causal mask buffer)

What maps exactly (the forward is the same):

- item and position embeddings (``max_seq_len`` = N; their input is E[id] sqrt(D) + P[pos],
  ours with ``scale_item_embeddings`` and ``position_encoding: from_start``);
- ``_uvqk`` -> ``uvqk_proj.weight``: transposed, columns regrouped per head ([u_h v_h q_h
  k_h] for each head h, which gives tensor-parallel ranks whole heads);
- ``_o`` -> ``output_proj``;
- their parameter-free layer norms -> ours with weight 1, bias 0 (``layernorm_epsilon``
  1e-6 as theirs);
- the relative position bias of every causal pair: ours is ``position_weights[min(i - j,
  P - 1)]``, so with P = N, ``position_weights[d] = _pos_w[N - 1 - d]``;
- the relative time bias: theirs buckets ``ts(next event of i) - ts(j)`` by ``ln(|gap|) /
  0.301``, clipped to their last bucket: ours with ``time_bias_origin: query`` (the next
  event's time is the query time) and ``time_bucket_fn: hstu_log``; ``_ts_w`` ->
  ``time_weights`` bucket by bucket (``num_time_buckets`` = their buckets + 1);
- their attention (SiLU(q.k + bias) / N, no scale): ours with ``attention_alpha: 1`` and the
  ``max_seq_len`` normaliser; their L2-normalised output (``output_normalization: l2``).

:func:`check_model_settings` refuses a config whose forward would not be theirs.

What does not map (so import and export keep it aside, and say so):

- the half of ``_pos_w`` for keys after the query (masked by causal attention) and the
  ``_attn_mask`` buffer: kept beside the checkpoint for the way back (``extras``);
- megatron_gr's own parameters, absent from their layout: the bias of ``uvqk_proj``, the
  layer norms' weights and biases, the time-gap embedding of the inputs (absent with
  ``time_feature: none``). Import sets them to their identity values (0, 1 and 0, 0);
  export refuses weights where they moved. With ``position_encoding: none`` a model has no
  position embedding: import accepts only an all-zero ``_pos_emb`` (which adds nothing) and
  export writes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_gr.config.errors import ConfigError

ITEMS = "_embedding_module._item_emb.weight"
POSITIONS = "_input_features_preproc._pos_emb.weight"
LAYER = "_hstu._attention_layers.{}."
MASK = "_attn_mask"
TIME_EMBEDDING = "preprocessor.time_embedding.weight"
POSITION_EMBEDDING = "preprocessor.position_embedding.weight"
GR_EPSILON = 1e-6


@dataclass(frozen=True)
class HSTUShape:
    """What the mapping needs of the megatron_gr model config."""

    num_layers: int
    hidden_size: int
    heads: int
    qk_dim: int
    v_dim: int
    max_seq_len: int
    relative_bias: bool
    position_buckets: int
    time_buckets: int
    time_embedding: bool
    """Whether the model has an input time-gap embedding (``time_feature`` not ``none``)."""
    position_embedding: bool
    """Whether the model has an input position embedding (``position_encoding`` not ``none``)."""

    @classmethod
    def of(cls, model) -> "HSTUShape":
        """From a ``GRTransformerConfig`` or a complete ``model`` section (dict)."""
        get = model.__getitem__ if isinstance(model, dict) else (lambda k: getattr(model, k))
        return cls(get("num_layers"), get("hidden_size"), get("num_attention_heads"), get("qk_head_dim"),
                   get("v_head_dim"), get("max_seq_len"), get("relative_attention_bias"), get("num_position_buckets"),
                   get("num_time_buckets"), get("time_feature") != "none", get("position_encoding") != "none")


# Settings without which their forward is not ours.
_GR_SETTINGS = {
    "attention_alpha": 1.0,
    "attention_normalizer": "max_seq_len",
    "layernorm_epsilon": GR_EPSILON,
    "enable_hyper_connections": False,
    "block_type": "stu",
    "scale_item_embeddings": True,
    "output_normalization": "l2",
    "contextual_len": 0,
    "max_attn_len": 0,
    "sla_k1": 0,
}
_GR_TIME_BIAS = {"time_bias_origin": "query", "time_bucket_fn": "hstu_log"}  # with their relative bias
_POSITION_ENCODINGS = ("from_start", "none")  # theirs counts from the start; none: an all-zero _pos_emb


def check_model_settings(model: dict) -> None:
    """Settings without which their forward is not ours (ConfigError naming the field).
    ``model``: a complete ``model`` section (``ExperimentConfig.to_dict()``)."""
    wanted = {**_GR_SETTINGS, **(_GR_TIME_BIAS if model["relative_attention_bias"] else {})}
    for key, value in wanted.items():
        if model[key] != value:
            raise ConfigError(f"model.{key}={model[key]!r}: a generative-recommenders HSTU computes with {key}={value!r}; set it in the config")
    if model["position_encoding"] not in _POSITION_ENCODINGS:
        raise ConfigError(
            f"model.position_encoding={model['position_encoding']!r}: a generative-recommenders HSTU counts positions "
            "from the first event; set position_encoding=from_start"
        )
    if model["relative_attention_bias"] and model["num_position_buckets"] != model["max_seq_len"]:
        raise ConfigError(
            f"model.num_position_buckets={model.get('num_position_buckets')} must equal model.max_seq_len="
            f"{model.get('max_seq_len')}: their relative position bias has one weight per distance up to N - 1"
        )


def _uvqk_rows(shape: HSTUShape) -> torch.Tensor:
    """For each row of our ``uvqk_proj.weight``, the column of their ``_uvqk`` it is."""
    h, dv, dqk = shape.heads, shape.v_dim, shape.qk_dim
    starts = (0, h * dv, 2 * h * dv, 2 * h * dv + h * dqk)  # u, v, q, k blocks
    widths = (dv, dv, dqk, dqk)
    rows = [torch.arange(start + head * width, start + (head + 1) * width)
            for head in range(h) for start, width in zip(starts, widths)]
    return torch.cat(rows)


def _expect(state: dict, name: str, shape: tuple, what: str) -> torch.Tensor:
    if name not in state:
        raise ConfigError(f"the generative-recommenders state dict has no {name} ({what})")
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise ConfigError(f"{name} has shape {list(tensor.shape)}, the config implies {list(shape)} ({what}): fix the config's model section")
    return tensor


def from_gr(state: dict[str, torch.Tensor], shape: HSTUShape) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Their state dict -> (our single-rank state dict, the extras that have no place in it)."""
    if ITEMS not in state:
        raise ConfigError(f"not a generative-recommenders HSTU retrieval state dict: no {ITEMS}")
    d, n = shape.hidden_size, shape.max_seq_len
    items = state[ITEMS]
    _expect(state, ITEMS, (items.shape[0], d), "model.hidden_size")
    layers = sum(1 for key in state if key.startswith("_hstu._attention_layers.") and key.endswith("._uvqk"))
    if layers != shape.num_layers:
        raise ConfigError(f"the state dict has {layers} HSTU layers, model.num_layers={shape.num_layers}")
    positions = _expect(state, POSITIONS, (n, d), "model.max_seq_len")
    ours = {"item_table.weight": items.clone()}
    if shape.position_embedding:
        ours[POSITION_EMBEDDING] = positions.clone()
    elif torch.any(positions != 0):
        raise ConfigError(f"model.position_encoding=none would drop their {POSITIONS}, which is not zero: set position_encoding=from_start")
    if shape.time_embedding:
        ours[TIME_EMBEDDING] = torch.zeros(shape.time_buckets, d, dtype=items.dtype)
    extras = {MASK: state[MASK].clone()} if MASK in state else {}
    width = shape.heads * (2 * shape.v_dim + 2 * shape.qk_dim)
    rows = _uvqk_rows(shape)
    for layer in range(shape.num_layers):
        theirs, mine = LAYER.format(layer), f"decoder.layers.{layer}."
        uvqk = _expect(state, theirs + "_uvqk", (d, width), "heads x (2 v_head_dim + 2 qk_head_dim)")
        dtype = uvqk.dtype
        ours[mine + "uvqk_proj.weight"] = uvqk.t()[rows].clone()
        ours[mine + "uvqk_proj.bias"] = torch.zeros(width, dtype=dtype)
        ours[mine + "output_proj.weight"] = _expect(state, theirs + "_o.weight", (d, shape.heads * shape.v_dim), "heads x v_head_dim").clone()
        ours[mine + "output_proj.bias"] = _expect(state, theirs + "_o.bias", (d,), "hidden_size").clone()
        for norm, size in (("input_layernorm", d), ("attention_output_layernorm", shape.heads * shape.v_dim)):
            ours[mine + f"{norm}.weight"] = torch.ones(size, dtype=dtype)
            ours[mine + f"{norm}.bias"] = torch.zeros(size, dtype=dtype)
        has_bias = theirs + "_rel_attn_bias._pos_w" in state
        if has_bias != shape.relative_bias:
            raise ConfigError(f"model.relative_attention_bias={shape.relative_bias} but the state dict {'has' if has_bias else 'has no'} relative attention bias")
        if has_bias:
            pos_w = _expect(state, theirs + "_rel_attn_bias._pos_w", (2 * n - 1,), "2 max_seq_len - 1")
            ts_w = _expect(state, theirs + "_rel_attn_bias._ts_w", (shape.time_buckets,), "model.num_time_buckets")
            ours[mine + "relative_bias.position_weights"] = pos_w[: n].flip(0).clone()  # distance d: _pos_w[N - 1 - d]
            ours[mine + "relative_bias.time_weights"] = ts_w.clone()
            extras[theirs + "_rel_attn_bias._pos_w"] = pos_w[n:].clone()  # keys after the query
    return ours, extras


_IDENTITY = {"uvqk_proj.bias": 0.0, "input_layernorm.weight": 1.0, "input_layernorm.bias": 0.0,
             "attention_output_layernorm.weight": 1.0, "attention_output_layernorm.bias": 0.0}


def to_gr(ours: dict[str, torch.Tensor], shape: HSTUShape, extras: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Our single-rank state dict -> theirs. Raises ConfigError when a parameter their
    layout lacks is not at its identity value (it would be dropped)."""
    extras = extras or {}
    n = shape.max_seq_len
    moved = [name for name in ours for suffix, value in _IDENTITY.items()
             if name.endswith(suffix) and not torch.all(ours[name] == value)]
    if shape.time_embedding and torch.any(ours[TIME_EMBEDDING] != 0):
        moved.append(TIME_EMBEDDING)
    if moved:
        raise ConfigError(
            f"{len(moved)} tensors have no place in the generative-recommenders layout and are not at their identity "
            f"values ({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}): exporting would change the model"
        )
    items = ours["item_table.weight"]
    if shape.position_embedding:
        positions = ours[POSITION_EMBEDDING].clone()
    else:  # theirs always adds one: zeros add nothing
        positions = torch.zeros(n, shape.hidden_size, dtype=items.dtype)
    theirs = {ITEMS: items.clone(), POSITIONS: positions}
    rows = _uvqk_rows(shape)
    for layer in range(shape.num_layers):
        mine, prefix = f"decoder.layers.{layer}.", LAYER.format(layer)
        weight = ours[mine + "uvqk_proj.weight"]
        uvqk = torch.empty_like(weight)
        uvqk[rows] = weight
        theirs[prefix + "_uvqk"] = uvqk.t().contiguous()
        theirs[prefix + "_o.weight"] = ours[mine + "output_proj.weight"].clone()
        theirs[prefix + "_o.bias"] = ours[mine + "output_proj.bias"].clone()
        if shape.relative_bias:
            after = extras.get(prefix + "_rel_attn_bias._pos_w")
            if after is None:
                after = torch.zeros(n - 1, dtype=weight.dtype)  # masked pairs: any value computes the same
            theirs[prefix + "_rel_attn_bias._pos_w"] = torch.cat([ours[mine + "relative_bias.position_weights"].flip(0), after])
            theirs[prefix + "_rel_attn_bias._ts_w"] = ours[mine + "relative_bias.time_weights"].clone()
    theirs[MASK] = extras[MASK] if MASK in extras else torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return theirs
