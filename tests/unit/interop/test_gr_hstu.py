"""Import of a Meta generative-recommenders HSTU retrieval state dict (built here with their
names and layouts) and export back: the round trip gives back every tensor exactly, and the
imported model's user embeddings equal a reference computation written from their layout
(float64), relative time bias included (``time_bias_origin: query`` with ``hstu_log``
buckets); encodings their layout lacks are written only where the config has them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatron_gr.config import resolve_config
from megatron_gr.models.registry import get_train_spec
from megatron_gr.training.evaluate_checkpoint import trainer_with_saved_weights
from megatron_gr.training.model_setup import unwrap
from tests.support.parity import assert_close_to_scale
from tests.unit.training.checkpoint_helpers import assert_one_error_line, run_cli
from tests.unit.training.helpers import tiny_config

N, HEADS, DQK, DV, D, LAYERS, TIME_BUCKETS = 20, 2, 8, 6, 16, 2, 129
TIME_EMBEDDING, POSITION_EMBEDDING = "preprocessor.time_embedding.weight", "preprocessor.position_embedding.weight"
GR_MODEL = {"num_layers": LAYERS, "hidden_size": D, "num_attention_heads": HEADS, "qk_head_dim": DQK, "v_head_dim": DV,
            "max_seq_len": N, "num_position_buckets": N, "num_time_buckets": TIME_BUCKETS, "time_bucket_fn": "hstu_log",
            "time_bias_origin": "query", "time_feature": "none", "attention_alpha": 1.0, "layernorm_epsilon": 1e-6,
            "hidden_dropout": 0.0, "embedding_dropout": 0.0}


def _gr_state_dict(num_items: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under their names and shapes."""
    def randn(*shape, std=0.3):
        return torch.randn(*shape, generator=generator) * std

    state = {"_embedding_module._item_emb.weight": randn(num_items + 1, D),
             "_input_features_preproc._pos_emb.weight": randn(N, D, std=0.1),
             "_attn_mask": torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1)}
    for layer in range(LAYERS):
        prefix = f"_hstu._attention_layers.{layer}."
        state[prefix + "_uvqk"] = randn(D, HEADS * (2 * DV + 2 * DQK))
        state[prefix + "_o.weight"] = randn(D, HEADS * DV)
        state[prefix + "_o.bias"] = randn(D, std=0.1)
        state[prefix + "_rel_attn_bias._pos_w"] = randn(2 * N - 1, std=0.5)
        state[prefix + "_rel_attn_bias._ts_w"] = randn(TIME_BUCKETS, std=0.5)
    return state


def _gr_time_buckets(timestamps: torch.Tensor, query_time: int) -> torch.Tensor:
    """Their time buckets [n, n] of one history: ln(|ts(next event of i) - ts(j)|) / 0.301,
    floored and clipped to their last bucket, the next event of the last one being the
    target (whose time they scatter after the history)."""
    following = torch.cat([timestamps[1:], torch.tensor([query_time])])
    gaps = following.view(-1, 1) - timestamps.view(1, -1)
    return (torch.log(gaps.abs().clamp(min=1).double()) / 0.301).long().clamp(0, TIME_BUCKETS - 1)


def _gr_user_embedding(state: dict, ids: torch.Tensor, timestamps: torch.Tensor, query_time: int) -> torch.Tensor:
    """Their HSTU forward for one history (float64), from the facts of their layout: input
    x = E[id] sqrt(D) + P[pos]; per layer, parameter-free layer norms (eps 1e-6),
    [u|v|q|k] = SiLU(norm(x) @ _uvqk), scores q.k + _pos_w[j - i + N - 1] + _ts_w[time
    bucket], SiLU(scores) / N over keys j <= i, x += _o(u * norm(attention)); the L2
    normalised state after the last event."""
    s = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    length = ids.numel()
    x = s["_embedding_module._item_emb.weight"][ids] * math.sqrt(D) + s["_input_features_preproc._pos_emb.weight"][:length]
    i = torch.arange(length)
    causal = (i.view(-1, 1) >= i.view(1, -1)).double()
    buckets = _gr_time_buckets(timestamps, query_time)
    for layer in range(LAYERS):
        p = f"_hstu._attention_layers.{layer}."
        h = F.silu(F.layer_norm(x, (D,), eps=1e-6) @ s[p + "_uvqk"])
        u, v, q, k = torch.split(h, [HEADS * DV, HEADS * DV, HEADS * DQK, HEADS * DQK], dim=1)
        q, k, v = q.view(length, HEADS, DQK), k.view(length, HEADS, DQK), v.view(length, HEADS, DV)
        bias = s[p + "_rel_attn_bias._pos_w"][i.view(1, -1) - i.view(-1, 1) + N - 1] + s[p + "_rel_attn_bias._ts_w"][buckets]
        scores = torch.einsum("ihd,jhd->hij", q, k) + bias
        attention = torch.einsum("hij,jhd->ihd", F.silu(scores) / N * causal, v).reshape(length, HEADS * DV)
        x = (u * F.layer_norm(attention, (HEADS * DV,), eps=1e-6)) @ s[p + "_o.weight"].t() + s[p + "_o.bias"] + x
    return F.normalize(x[-1], dim=0)


def _import_args(tmp, state: dict, model: dict, name: str) -> list[str]:
    """``checkpoint import-gr`` arguments of ``state`` for the tiny config with ``model``
    settings, into ``tmp / name``."""
    config_path = tmp / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(tmp, model=model).to_dict(), sort_keys=False))
    torch.save(state, tmp / f"{name}.pt")
    return ["checkpoint", "import-gr", str(tmp / f"{name}.pt"), "--config", str(config_path), "--out", str(tmp / name)]


@pytest.fixture(scope="module")
def imported(megatron_cpu, tmp_path_factory):
    from megatron_gr.cli import main

    tmp = tmp_path_factory.mktemp("gr")
    config = tiny_config(tmp, model=GR_MODEL)
    config_path = tmp / "gr.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    num_items = get_train_spec("retrieval").build_dataset(config).num_items
    state = _gr_state_dict(num_items, torch.Generator().manual_seed(7))
    torch.save({"epoch": 3, "model_state_dict": state}, tmp / "gr_hstu.pt")
    assert main(["checkpoint", "import-gr", str(tmp / "gr_hstu.pt"), "--config", str(config_path), "--out", str(tmp / "imported")]) == 0
    return tmp, state, config_path


def test_import_then_export_gives_back_the_same_state_dict(imported):
    from megatron_gr.cli import main

    tmp, state, _ = imported
    assert main(["checkpoint", "export-gr", str(tmp / "imported"), "--out", str(tmp / "exported.pt")]) == 0
    exported = torch.load(tmp / "exported.pt", weights_only=True)
    assert exported.keys() == state.keys()
    for name, tensor in state.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_imported_model_computes_their_forward(imported):
    tmp, state, config_path = imported
    trainer = trainer_with_saved_weights(resolve_config(str(config_path), [(["checkpoint", "load"], str(tmp / "imported"))]))
    model = unwrap(trainer.model[0]).eval()
    batch = next(iter(trainer.spec.evaluation_batches(trainer.plan, trainer.dataset, "valid", 0, 1)))
    with torch.no_grad():
        users = model.encode(batch)[batch.offsets[1:] - 1]
    histories = list(zip(batch.offsets[:-1].tolist(), batch.offsets[1:].tolist()))
    expected = torch.stack([
        _gr_user_embedding(state, batch.item_ids[start:end], batch.timestamps[start:end], int(batch.query_timestamps[end - 1]))
        for start, end in histories
    ])
    assert batch.lengths.max() > 5
    longest = max(histories, key=lambda h: h[1] - h[0])
    assert _gr_time_buckets(batch.timestamps[slice(*longest)], int(batch.query_timestamps[longest[1] - 1])).unique().numel() > 3
    assert_close_to_scale(users, expected, rtol=1e-5, what="user embeddings (fp32 vs their float64 forward)")


def test_export_refuses_weights_their_layout_cannot_hold(imported, tmp_path, capsys):
    from megatron_gr.training.trainer import Trainer

    tmp, _, config_path = imported
    config = tiny_config(tmp_path, model=GR_MODEL, training={"train_iters": 1, "lr_decay_iters": 1, "lr_warmup_iters": 0},
                         checkpoint={"load": str(tmp / "imported"), "save": str(tmp_path / "tuned")})
    Trainer(config).train()
    code, err, _ = run_cli(capsys, "checkpoint", "export-gr", str(tmp_path / "tuned"), "--out", str(tmp_path / "gr.pt"))
    assert_one_error_line(code, err, "identity values")
    assert not (tmp_path / "gr.pt").exists()


def test_config_that_does_not_describe_the_state_dict(imported, tmp_path, capsys):
    tmp, _, config_path = imported
    raw = yaml.safe_load(config_path.read_text())
    raw["model"]["v_head_dim"] = 8
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    code, err, _ = run_cli(capsys, "checkpoint", "import-gr", str(tmp / "gr_hstu.pt"), "--config", str(other), "--out", str(tmp_path / "x"))
    assert_one_error_line(code, err, "_uvqk", "shape")
    raw["model"]["v_head_dim"], raw["model"]["attention_alpha"] = DV, None
    other.write_text(yaml.safe_dump(raw))
    code, err, _ = run_cli(capsys, "checkpoint", "import-gr", str(tmp / "gr_hstu.pt"), "--config", str(other), "--out", str(tmp_path / "x"))
    assert_one_error_line(code, err, "attention_alpha")
    raw["model"]["attention_alpha"], raw["model"]["time_bias_origin"] = 1.0, "token"
    other.write_text(yaml.safe_dump(raw))
    code, err, _ = run_cli(capsys, "checkpoint", "import-gr", str(tmp / "gr_hstu.pt"), "--config", str(other), "--out", str(tmp_path / "x"))
    assert_one_error_line(code, err, "time_bias_origin='token'", "query")
    assert not (tmp_path / "x").exists()


def test_encodings_their_layout_lacks(imported, tmp_path, capsys):
    """``time_feature: none``: no time embedding is written (``since_previous``: a zero one,
    which adds nothing). ``position_encoding: none``: only an all-zero ``_pos_emb`` imports
    (it is dropped), and export writes the zeros back."""
    from megatron_gr.checkpoint_tools import describe
    from tests.unit.checkpoint_tools.helpers import all_entries

    tmp, state, _ = imported
    tensors = describe(tmp / "imported")["tensors"]
    assert TIME_EMBEDDING not in tensors and POSITION_EMBEDDING in tensors
    model = {**GR_MODEL, "position_encoding": "none", "time_feature": "since_previous"}
    code, err, _ = run_cli(capsys, *_import_args(tmp_path, state, model, "dropped"))
    assert_one_error_line(code, err, "position_encoding=none", "_input_features_preproc._pos_emb.weight")
    assert not (tmp_path / "dropped").exists()
    zero = {**state, "_input_features_preproc._pos_emb.weight": torch.zeros(N, D)}
    code, err, _ = run_cli(capsys, *_import_args(tmp_path, zero, model, "zero"))
    assert code == 0, err
    imported_zero = all_entries(tmp_path / "zero")
    assert POSITION_EMBEDDING not in imported_zero
    assert torch.equal(imported_zero[TIME_EMBEDDING], torch.zeros(TIME_BUCKETS, D))
    code, err, _ = run_cli(capsys, "checkpoint", "export-gr", str(tmp_path / "zero"), "--out", str(tmp_path / "zero_gr.pt"))
    assert code == 0, err
    exported = torch.load(tmp_path / "zero_gr.pt", weights_only=True)
    assert exported.keys() == zero.keys() and all(torch.equal(exported[k], zero[k]) for k in zero)
