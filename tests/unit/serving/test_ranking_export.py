"""``megatron-gr export`` of the ranking models (DLRM-HSTU; ULTRA-HSTU with two channels,
semi-local attention and attention truncation): the exported program's candidate scores
equal the training-time evaluation's on the same requests (fp32: within 1e-5 of the
largest score, as the program pads every sequence to max_seq_len, which reorders the
attention sums) and so do the metrics computed from them, for any number of requests and
candidates (a request alone scores as in a batch; one request may carry many candidates,
none seeing another), and the file runs with PyTorch alone (megatron_gr and megatron-core not
importable)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from megatron_gr.models.ranking.metrics import task_metrics
from megatron_gr.models.ranking.serving import requests_of
from megatron_gr.training.evaluate_checkpoint import trainer_with_saved_weights
from megatron_gr.training.model_setup import unwrap
from tests.support.parity import assert_close_to_scale
from tests.unit.models.test_ultra_model import CLICK, IMP, TWO_CHANNELS, tiny
from tests.unit.serving.programs import program_metadata, program_module
from tests.unit.training.checkpoint_helpers import assert_one_error_line, run_cli

MODELS = {
    "dlrm_hstu": ({}, None),
    "ultra_hstu": ({"transducers": TWO_CHANNELS}, {**IMP, **CLICK}),
}


def _config(tmp, name, **checkpoint):
    model, features = MODELS[name]
    raw = tiny(tmp, model=model, features=features).to_dict()
    raw["checkpoint"].update(checkpoint)
    raw["logging"]["metrics_file"] = None
    return raw


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, megatron_cpu, tmp_path_factory):
    from megatron_gr.cli import main
    from megatron_gr.config import ExperimentConfig
    from megatron_gr.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp(f"export_{request.param}")
    Trainer(ExperimentConfig.from_dict(_config(tmp, request.param, save=str(tmp / "run")))).train()
    yaml_path = tmp / "ranking.yaml"
    yaml_path.write_text(yaml.safe_dump(_config(tmp, request.param), sort_keys=False))
    assert main(["export", "--config", str(yaml_path), "--load", str(tmp / "run"), "--out", str(tmp / "ranking.pt2")]) == 0
    return tmp, yaml_path


def _evaluation(tmp):
    """The trainer as evaluation holds the saved model, and the valid split's batches."""
    from megatron_gr.config import resolve_config

    config = resolve_config(str(tmp / "ranking.yaml"), [(["checkpoint", "load"], str(tmp / "run"))])
    trainer = trainer_with_saved_weights(config)
    batches = list(trainer.spec.evaluation_batches(trainer.plan, trainer.dataset, "valid", 0, 1))
    return trainer, unwrap(trainer.model[0]).eval(), batches


def _call(program, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return program(*inputs.values())


def _slice_requests(inputs: dict, begin: int, end: int) -> dict:
    """Requests ``begin:end`` of the program's inputs."""
    def cut(values, offsets):
        return values[int(offsets[begin]):int(offsets[end])], offsets[begin:end + 1] - offsets[begin]

    candidate_ids, candidate_offsets = cut(inputs["candidate_ids"], inputs["candidate_offsets"])
    histories = {}
    for key, h in inputs["histories"].items():
        fields = {f: cut(h[f], h["offsets"])[0] for f in ("ids", "actions", "watchtimes", "timestamps")}
        histories[key] = {**fields, "offsets": h["offsets"][begin:end + 1] - h["offsets"][begin]}
    return {
        "query_times": inputs["query_times"][begin:end],
        "contextual_ids": inputs["contextual_ids"][begin:end],
        "candidate_ids": candidate_ids,
        "candidate_timestamps": cut(inputs["candidate_timestamps"], inputs["candidate_offsets"])[0],
        "candidate_offsets": candidate_offsets,
        "histories": histories,
    }


def test_program_scores_equal_the_training_time_evaluation(exported):
    tmp, _ = exported
    program = program_module(tmp / "ranking.pt2")
    trainer, model, batches = _evaluation(tmp)
    served, expected, labels, users = [], [], [], []
    for batch in batches:
        with torch.no_grad():
            evaluated = model(batch)  # the evaluation's CandidateScores
        scores = _call(program, requests_of(batch))
        assert scores.shape == evaluated.scores.shape
        assert_close_to_scale(scores, evaluated.scores, rtol=1e-5, what="candidate scores")
        served.append(scores.double().numpy())
        expected.append(evaluated.scores.double().numpy())
        labels.append(evaluated.labels.double().numpy())
        users.append(evaluated.user_ids.numpy())
    tasks = trainer.config.ranking.tasks
    served, labels, users = np.concatenate(served), np.concatenate(labels), np.concatenate(users)
    oracle = np.full_like(served, np.nan)
    metrics = task_metrics(tasks, served, labels, users, oracle, trainer.config.ranking.selection_task)
    reference = trainer.evaluate("valid")
    for name, value in metrics.items():
        assert value == pytest.approx(reference[name], abs=1e-6), name


def test_any_number_of_requests_and_candidates(exported):
    tmp, _ = exported
    program = program_module(tmp / "ranking.pt2")
    _, model, batches = _evaluation(tmp)
    inputs = requests_of(batches[0])
    full = _call(program, inputs)
    offsets = inputs["candidate_offsets"]
    for begin, end in ((0, 1), (1, 3), (2, 7)):
        alone = _call(program, _slice_requests(inputs, begin, end))
        assert_close_to_scale(alone, full[int(offsets[begin]):int(offsets[end])], rtol=1e-5,
                              what=f"requests {begin}:{end} alone and in a batch")
    # One history, many candidates: request 0 scores the candidates of requests 0..3 in
    # one pass (as many as its sequence has room for). A candidate sees no other candidate
    # (its position in the sequence is its own: with the relative position bias it
    # matters), so the first k of them score as a request of those k alone.
    one = _slice_requests(inputs, 0, 1)
    pool = _slice_requests(inputs, 0, 4)
    room = model.config.max_seq_len - one["contextual_ids"].shape[1] - max(
        int(h["offsets"][-1]) for h in one["histories"].values())
    many = min(room, pool["candidate_ids"].shape[0])
    assert many > int(one["candidate_offsets"][-1])

    def first(k: int) -> dict:
        return dict(one, candidate_ids=pool["candidate_ids"][:k], candidate_timestamps=pool["candidate_timestamps"][:k],
                    candidate_offsets=torch.tensor([0, k]))

    scores = _call(program, first(many))
    assert scores.shape == (many, len(model.tasks))
    for k in range(1, many):
        assert_close_to_scale(_call(program, first(k)), scores[:k], rtol=1e-5, what=f"the first {k} candidates alone")


def test_program_runs_without_megatron(exported, tmp_path):
    tmp, _ = exported
    _, _, batches = _evaluation(tmp)
    inputs = requests_of(batches[0])
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, json, torch\n"
        "sys.modules['megatron_gr'] = None; sys.modules['megatron'] = None  # any import of them fails\n"
        "files = {'megatron_gr.json': ''}\n"
        f"program = torch.export.load({str(tmp / 'ranking.pt2')!r}, extra_files=files)\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"torch.save(program.module()(*inputs.values()), {str(tmp_path / 'outputs.pt')!r})\n"
        "print(json.loads(files['megatron_gr.json'])['tasks'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['click', 'like', 'watch_time']"
    expected = _call(program_module(tmp / "ranking.pt2"), inputs)
    assert torch.equal(torch.load(tmp_path / "outputs.pt"), expected)


def test_metadata_names_inputs_tasks_and_raw_ids(exported):
    tmp, _ = exported
    metadata = program_metadata(tmp / "ranking.pt2")
    trainer, model, _ = _evaluation(tmp)
    channels = ["imp", "click"] if hasattr(model, "channels") else ["uih"]
    assert metadata["model_type"] == "ranking" and metadata["tasks"] == ["click", "like", "watch_time"]
    assert list(metadata["inputs"]["histories"]) == channels
    data = trainer.dataset.data
    assert metadata["raw_ids"]["item"] == data.tables["item"].vocab.tolist()


def test_top_k_is_refused_for_ranking(exported, tmp_path, capsys):
    tmp, yaml_path = exported
    code, err, _ = run_cli(capsys, "export", "--config", str(yaml_path), "--load", str(tmp / "run"),
                           "--out", str(tmp_path / "x.pt2"), "--top-k", "5")
    assert_one_error_line(code, err, "--top-k applies to retrieval")
    assert not (tmp_path / "x.pt2").exists()



def test_a_request_longer_than_max_seq_len_is_one_error(exported):
    tmp, _ = exported
    program = program_module(tmp / "ranking.pt2")
    _, model, batches = _evaluation(tmp)
    one = _slice_requests(requests_of(batches[0]), 0, 1)
    count = model.config.max_seq_len + 1  # more candidates than a sequence holds
    too_many = dict(one, candidate_ids=one["candidate_ids"][:1].repeat(count, 1),
                    candidate_timestamps=one["candidate_timestamps"][:1].repeat(count),
                    candidate_offsets=torch.tensor([0, count]))
    with pytest.raises(RuntimeError, match=r"exceed max_seq_len=\d+: send fewer candidates"):
        _call(program, too_many)


def test_a_triton_run_exports_the_pytorch_ops(exported, tmp_path, monkeypatch):
    """A config that runs the Triton kernels (here in Triton's interpreter, as ``auto`` does on
    a GPU) exports the PyTorch ops: Triton kernels are not traceable, and the program scores
    as the one exported with ``kernel_backend=pytorch``."""
    from megatron_gr.cli import main

    # The CPU run's kernel_backend=triton is accepted with the interpreter on (conftest turns
    # it on where there is no GPU; on a GPU machine too here).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tmp, yaml_path = exported
    assert main(["export", "--config", str(yaml_path), "--load", str(tmp / "run"), "--out", str(tmp_path / "t.pt2"),
                 "--kernel-backend", "triton"]) == 0
    inputs = requests_of(_evaluation(tmp)[2][0])
    expected = _call(program_module(tmp / "ranking.pt2"), inputs)
    assert torch.equal(_call(torch.export.load(tmp_path / "t.pt2").module(), inputs), expected)


def test_an_fp8_model_is_one_error(tmp_path, capsys):
    """Refused before any weights load: the FP8 casts are Triton kernels, not traceable."""
    yaml_path = tmp_path / "ranking.yaml"
    yaml_path.write_text(yaml.safe_dump(_config(tmp_path, "dlrm_hstu"), sort_keys=False))
    code, err, _ = run_cli(capsys, "export", "--config", str(yaml_path), "--load", str(tmp_path / "run"),
                           "--out", str(tmp_path / "x.pt2"), "--fp8-format", "e4m3")
    assert_one_error_line(code, err, "model.fp8='e4m3'", "--set model.fp8=null")
    assert not (tmp_path / "x.pt2").exists()
