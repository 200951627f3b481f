"""``megatron-gr export``: the exported program's user embeddings, scores and top-k items
equal the training-time evaluation's on the same users (fp32: within 1e-5 of the largest
entry, as the program pads histories to max_seq_len, which reorders the attention sums;
ranks and metrics exactly), for any number of users and tokens, with and without
hyper-connections, for a model that reads query times and scores raw dot products, and the
file runs with PyTorch alone (megatron_gr and megatron-core not importable)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_gr.models.retrieval_head import full_corpus_ranks, item_vectors
from megatron_gr.models.retrieval_serving import reads_query_times
from megatron_gr.models.retrieval_metrics import metric_sums, metrics_from_sums
from megatron_gr.training.evaluate_checkpoint import trainer_with_saved_weights
from megatron_gr.training.model_setup import unwrap
from tests.support.parity import assert_close_to_scale
from tests.unit.serving.programs import program_metadata, program_module
from tests.unit.training.checkpoint_helpers import assert_one_error_line, config_file, run_cli
from tests.unit.training.helpers import tiny_config

TRAINING = {"train_iters": 3, "lr_decay_iters": 3, "lr_warmup_iters": 1, "eval_interval": 3}
TOP_K = 7


MODELS = {
    "hstu": {},
    "hstu_mhc": {"enable_hyper_connections": True},
    # The HSTU paper's time to the query, in the inputs and the attention bias; dot products.
    "hstu_query_time": {"time_feature": "until_query", "time_bias_origin": "query", "time_bucket_fn": "hstu_log",
                        "output_normalization": "none", "softmax_temperature": 1.0},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, megatron_cpu, tmp_path_factory):
    from megatron_gr.cli import main
    from megatron_gr.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp(f"export_{request.param}")
    model = MODELS[request.param]
    Trainer(tiny_config(tmp, model=model, training=TRAINING, checkpoint={"save": str(tmp / "run")})).train()
    yaml_path = config_file(tmp, model=model, training=TRAINING)
    assert main(["export", "--config", str(yaml_path), "--load", str(tmp / "run"), "--out", str(tmp / "hstu.pt2"),
                 "--top-k", str(TOP_K)]) == 0
    return tmp, yaml_path


def _evaluation(tmp):
    """The model as evaluation holds it, and the valid split's batches."""
    from megatron_gr.config import resolve_config

    config = resolve_config(str(tmp / "tiny.yaml"), [(["checkpoint", "load"], str(tmp / "run"))])
    trainer = trainer_with_saved_weights(config)
    batches = list(trainer.spec.evaluation_batches(trainer.plan, trainer.dataset, "valid", 0, 1))
    return trainer, unwrap(trainer.model[0]).eval(), batches


def _inputs(model, batch, users=None):
    """The program's inputs for the first ``users`` histories of ``batch`` (all by default):
    with query times, each history's last token is queried at its target's time."""
    users = batch.batch_size if users is None else users
    end = int(batch.offsets[users])
    inputs = (batch.item_ids[:end], batch.timestamps[:end], batch.offsets[: users + 1])
    if reads_query_times(model.config):
        inputs += (batch.query_timestamps[batch.offsets[1 : users + 1] - 1],)
    return inputs


def test_program_scores_equal_the_training_time_evaluation(exported):
    tmp, _ = exported
    program = program_module(tmp / "hstu.pt2")
    trainer, model, batches = _evaluation(tmp)
    normalize = model.config.output_normalization == "l2"
    corpus = item_vectors(model.item_table, model.corpus_ids, normalize=normalize)
    sums = None
    for batch in batches:
        with torch.no_grad():
            expected_user = model.encode(batch)[batch.offsets[1:] - 1]
            expected_ranks = model(batch)  # the evaluation's full-corpus ranks
        user, scores, items = program(*_inputs(model, batch))
        assert_close_to_scale(user, expected_user, rtol=1e-5, what="user embeddings")
        expected_scores = expected_user @ corpus.t()
        top = torch.topk(expected_scores, TOP_K, dim=1)
        assert_close_to_scale(scores, top.values, rtol=1e-5, what="top-k scores")
        assert torch.equal(items, model.corpus_ids[top.indices])
        ranks = full_corpus_ranks(user, batch.target_ids, model.item_table, corpus_ids=model.corpus_ids,
                                  normalize_items=normalize)
        assert torch.equal(ranks, expected_ranks)
        sums = metric_sums(ranks) if sums is None else sums + metric_sums(ranks)
    assert metrics_from_sums(sums) == trainer.evaluate("valid")


def test_any_number_of_users_and_tokens(exported):
    tmp, _ = exported
    program = program_module(tmp / "hstu.pt2")
    _, model, batches = _evaluation(tmp)
    batch = batches[0]
    full, _, _ = program(*_inputs(model, batch))
    for users in (1, 2, 5):
        user, scores, items = program(*_inputs(model, batch, users))
        assert user.shape == (users, model.config.hidden_size) and items.shape == (users, TOP_K)
        assert_close_to_scale(user, full[:users], rtol=1e-5, what=f"{users} users alone and in a batch")
    one_token = (batch.item_ids[:1], batch.timestamps[:1], torch.tensor([0, 1]))
    if reads_query_times(model.config):
        one_token += (batch.timestamps[:1] + 60,)
    assert program(*one_token)[2].shape == (1, TOP_K)


def test_program_runs_without_megatron(exported, tmp_path):
    tmp, _ = exported
    _, model, batches = _evaluation(tmp)
    inputs = _inputs(model, batches[0])
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, json, torch\n"
        "sys.modules['megatron_gr'] = None; sys.modules['megatron'] = None  # any import of them fails\n"
        f"files = {{'megatron_gr.json': ''}}\n"
        f"program = torch.export.load({str(tmp / 'hstu.pt2')!r}, extra_files=files)\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"torch.save(program.module()(*inputs), {str(tmp_path / 'outputs.pt')!r})\n"
        "print(json.loads(files['megatron_gr.json'])['top_k'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(TOP_K)
    outputs = torch.load(tmp_path / "outputs.pt")
    expected = program_module(tmp / "hstu.pt2")(*inputs)
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)


def test_metadata_maps_items_to_raw_ids(exported):
    tmp, _ = exported
    metadata = program_metadata(tmp / "hstu.pt2")
    trainer, model, _ = _evaluation(tmp)
    assert metadata["raw_item_ids"] == trainer.dataset.items.vocab.tolist()
    assert list(metadata["inputs"]) == ["item_ids", "timestamps", "offsets"] + ["query_times"] * reads_query_times(model.config)
    assert metadata["top_k"] == TOP_K and metadata["model_type"] == "retrieval"


def test_bad_requests_are_one_line(exported, tmp_path, capsys):
    tmp, yaml_path = exported
    code, err, _ = run_cli(capsys, "export", "--config", str(yaml_path), "--load", str(tmp / "run"), "--out", str(tmp / "hstu.pt2"))
    assert_one_error_line(code, err, "already exists")
    code, err, _ = run_cli(capsys, "export", "--config", str(yaml_path), "--load", str(tmp / "run"), "--out", str(tmp_path / "x.onnx"))
    assert_one_error_line(code, err, ".pt2")
    code, err, _ = run_cli(capsys, "export", "--config", str(yaml_path), "--load", str(tmp / "run"), "--out", str(tmp_path / "x.pt2"),
                           "--top-k", "100000")
    assert_one_error_line(code, err, "top_k=100000")
    assert not (tmp_path / "x.pt2").exists()


def test_viewless_tensor_shim_is_scoped():
    from megatron.core import utils
    from megatron.core.transformer import transformer_block

    from megatron_gr.compat import traceable_viewless_tensors

    original = utils.make_viewless_tensor
    x = torch.ones(2, 3)
    with traceable_viewless_tensors():
        assert utils.make_viewless_tensor(x, requires_grad=False, keep_graph=True) is x
        assert transformer_block.make_viewless_tensor(inp=x, requires_grad=True, keep_graph=True) is x
    assert utils.make_viewless_tensor is original and transformer_block.make_viewless_tensor is original
