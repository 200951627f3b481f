"""Stopping on purpose: SIGTERM and SIGUSR1 save at the end of the current step and exit 0;
``exit_interval`` and ``exit_duration_in_mins`` likewise; Ctrl-C is one line and exit code
130; after SIGTERM or ``kill -9`` no helper process of the trainer stays alive."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from megatron_gr.training import checkpointing
from megatron_gr.training.trainer import Trainer
from tests.unit.training.checkpoint_helpers import config_file, run_cli, start_cli, still_alive, wait_for_line
from tests.unit.training.helpers import read_records, tiny_config

LONG = {"train_iters": 50, "lr_decay_iters": None, "lr_warmup_iters": 0}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_at_the_end_of_the_step(megatron_cpu, tmp_path, sig):
    save = tmp_path / "ckpt"
    config = tiny_config(tmp_path, training=LONG, checkpoint={"save": str(save)})
    trainer = Trainer(config)
    launch = trainer.launch_step

    def step_then_signal():
        previous = launch()
        if trainer.state.iteration == 1:  # inside step 2
            os.kill(os.getpid(), sig)
        return previous

    trainer.launch_step = step_then_signal
    previous = signal.getsignal(sig)
    result = trainer.train()
    assert result == {"exited": f"{sig.name} received", "iteration": 2}
    assert checkpointing.latest_iteration(save) == 2
    assert [r["step"] for r in read_records(config.logging.metrics_file)] == [1, 2]
    assert not read_records(config.logging.metrics_file, "test")  # no final evaluation
    assert signal.getsignal(sig) == previous  # the handler lives only as long as the loop
    assert Trainer(tiny_config(tmp_path / "again", training=LONG, checkpoint={"load": str(save)})).state.iteration == 2


@pytest.mark.parametrize("training, reason, step", [
    ({"exit_interval": 3}, "exit interval 3 reached (training.exit_interval)", 3),
    ({"exit_duration_in_mins": 1e-6}, "1e-06 minutes elapsed (training.exit_duration_in_mins)", 1),
])
def test_exit_interval_and_duration(megatron_cpu, tmp_path, capsys, training, reason, step):
    save = tmp_path / "ckpt"
    trainer = Trainer(tiny_config(tmp_path, training={**LONG, **training}, checkpoint={"save": str(save)}))
    capsys.readouterr()
    assert trainer.train() == {"exited": reason, "iteration": step}
    assert checkpointing.latest_iteration(save) == step
    assert f"{reason} at step {step}: exiting (checkpoint of step {step} in {save})" in capsys.readouterr().out


def test_exit_without_save_directory_says_nothing_was_saved(megatron_cpu, tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, training={**LONG, "exit_interval": 1}))
    capsys.readouterr()
    assert trainer.train()["iteration"] == 1
    assert "exiting (no --save directory, nothing saved)" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_exit_code_130(megatron_cpu, tmp_path, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    code, err, _ = run_cli(capsys, "pretrain", "--config", str(config_file(tmp_path, training=LONG)))
    assert code == 130
    assert len(err) == 1 and err[0].startswith("interrupted (Ctrl-C)")


# --------------------------------------------------------------- real processes
@pytest.mark.slow
def test_processes_sigterm_saves_and_kill_9_leaves_no_helper(tmp_path):
    save = tmp_path / "ckpt"
    # SIGTERM: saves the step it is in, exits 0, leaves no process behind.
    process = start_cli(tmp_path, "--save", str(save), "--save-interval", "3", "--log-interval", "1")
    wait_for_line(process, "saved checkpoint of step 3")
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    assert "SIGTERM received at step" in out
    step = checkpointing.latest_iteration(save)
    assert step >= 3 and f"SIGTERM received at step {step}: exiting (checkpoint of step {step}" in out
    assert still_alive(children) == []

    # kill -9 after a save (the save used to leave a ~430 MB spawn manager process running).
    process = start_cli(tmp_path, "--save", str(save), "--load", str(save), "--save-interval", "1", "--log-interval", "1")
    wait_for_line(process, f"saved checkpoint of step {step + 2}")
    children = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.wait(timeout=60)
    assert still_alive(children) == []
