"""Megatron-style flags and --set, and what the CLI prints for user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from megatron_gr.cli import main
from megatron_gr.config import ConfigError
from megatron_gr.config.loader import parse_assignment


def test_flags_and_set_reach_their_keys(capsys):
    code = main([
        "show-config", "--train-iters", "7", "--micro-batch-size", "16", "--lr", "3e-4",
        "--bf16", "--save", "runs/x", "--set", "model.num_layers=5", "--set", "data.synthetic.num_users=11",
        "--set", "training.train_iters=9",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "train_iters: 9" in out  # --set is applied after the shorthand flag
    assert "micro_batch_size: 16" in out
    assert "lr: 0.0003" in out
    assert "precision: bf16" in out
    assert "save: runs/x" in out
    assert "num_layers: 5" in out
    assert "num_users: 11" in out


def test_show_config_names_the_source_auto_stands_for(tmp_path, capsys):
    assert main(["show-config"]) == 0
    assert capsys.readouterr().out.endswith("# data.source auto -> synthetic\n")
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    assert main(["show-config", "--data-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("# data.source auto -> movielens\n")
    assert yaml.safe_load(out)["data"] == {**yaml.safe_load(out)["data"], "source": "auto", "path": str(tmp_path)}
    assert main(["show-config", "--data-path", str(tmp_path / "nowhere")]) == 0
    assert "# data.source auto -> unresolved: data path" in capsys.readouterr().out


@pytest.mark.parametrize("expression", ["model.num_layers", "num_layers=3", ".x=1", "model.=1"])
def test_bad_set_expression(expression):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_assignment(expression)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--train-iters", "ten"], ["training.train_iters='ten'", "integer"]),
        (["--set", "model.heads=4"], ["unknown key model.heads"]),
        (["--set", "training.lr=0"], ["training.lr=0", "> 0"]),
    ],
)
def test_cli_prints_one_line_without_traceback(argv, words):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gr.cli", "show-config", *argv], capture_output=True, text=True
    )
    _assert_user_error(result, words)


def _assert_user_error(result, words):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for word in words:
        assert word in result.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--data-source", "movielens", "--data-path", "/nonexistent/ml"], ["/nonexistent/ml", "does not exist"]),
        (["--load", "{bad}"], ["corrupt", "latest_checkpointed_iteration.txt"]),
        # A path of no known data: never a silent run on synthetic data.
        (["--data-path", "{bad}"], ["cannot tell what data the directory {bad} holds", "u.data", "manifest.json"]),
    ],
)
def test_pretrain_user_errors_without_traceback(tmp_path, argv, words):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latest_checkpointed_iteration.txt").write_text("xx\n")
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    words = [w.replace("{bad}", str(bad)) for w in words]
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--cpu", "--train-iters", "1", *argv],
        capture_output=True, text=True,
    )
    _assert_user_error(result, words)
