"""launch/: the exact torchrun commands for a fake 2-node Slurm allocation and for a local
run, from the launcher and from the sbatch script's dry run."""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
spec = importlib.util.spec_from_file_location("launch_py", LAUNCH / "launch.py")
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)

FAKE_ALLOCATION = {  # what Slurm sets in a 2-node job with 8 GPUs per node
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "hstu",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_GPUS_PER_NODE": "h100:8",
}


def node_command(node: int, run_dir: str = "runs/hstu", flags: str = "--config c.yaml --tensor-model-parallel-size 2") -> str:
    return (
        "python3 -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
        "--rdzv-endpoint=gpu-a07:29500 --rdzv-id=4242 --max-restarts=0 "
        f"--log-dir={run_dir}/logs/node{node} --redirects=3 --tee=3 -m megatron_gr.cli pretrain {flags} "
        f"--save {run_dir}/checkpoints --load {run_dir}/checkpoints"
    )


@pytest.mark.parametrize("hostlist, hosts", [
    ("gpu-a[07-08]", ["gpu-a07", "gpu-a08"]),
    ("n[1-3,10],login2", ["n1", "n2", "n3", "n10", "login2"]),
    ("r[1-2]-n[09-10]", ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]),
    ("single", ["single"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert launch.expand_hostlist(hostlist) == hosts


def test_slurm_commands_for_a_fake_two_node_allocation():
    commands = launch.slurm_commands(FAKE_ALLOCATION, Path("runs/hstu"), ["pretrain", "--config", "c.yaml", "--tensor-model-parallel-size", "2"], python="python3")
    assert [shlex.join(c) for c in commands] == [node_command(0), node_command(1)]


def test_user_checkpoint_dirs_are_kept():
    command = launch.slurm_commands(FAKE_ALLOCATION, Path("r"), ["pretrain", "--save", "s", "--load", "s"])[0]
    assert command[-4:] == ["--save", "s", "--load", "s"]


def test_outside_an_allocation_is_a_clear_error():
    with pytest.raises(SystemExit, match="not inside a Slurm allocation"):
        launch.slurm_commands({}, Path("r"), ["pretrain"])


def test_sbatch_dry_run_prints_every_node_command():
    env = {**os.environ, **FAKE_ALLOCATION, "DRY_RUN": "1", "PYTHON": "python3", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    env.pop("RUN_DIR", None)
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_pretrain.sbatch"), "--config", "c.yaml", "--tensor-model-parallel-size", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [node_command(0), node_command(1)]


def test_local_dry_run():
    result = subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "4", "--cpu", "--pipeline-model-parallel-size", "2"],
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "RUN_DIR": "runs/x"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shlex.join([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--log-dir=runs/x/logs",
        "--redirects=3", "--tee=3", "-m", "megatron_gr.cli", "pretrain", "--cpu", "--pipeline-model-parallel-size", "2",
    ])


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_sbatch_usr1_saves_then_requeues(tmp_path):
    """Slurm's USR1 before the time limit: the script passes it to the job step, waits for
    the ranks to save and exit, then requeues (stubs stand in for srun, scancel, scontrol)."""
    calls, pid_file = tmp_path / "calls", tmp_path / "step.pid"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the job step: a "training" that saves and exits 0 on USR1
    _stub(bin_dir, "srun", f'trap \'echo "step: USR1, saved" >> {calls}; exit 0\' USR1\n'
                           f'echo $$ > {pid_file}\nwhile true; do sleep 0.1; done\n')
    _stub(bin_dir, "scancel", f'echo "scancel $*" >> {calls}\nkill -USR1 "$(cat {pid_file})"\n')
    _stub(bin_dir, "scontrol", f'echo "scontrol $*" >> {calls}\n')
    env = {**os.environ, **FAKE_ALLOCATION, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run"),
           "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    script = subprocess.Popen(["bash", str(LAUNCH / "slurm_pretrain.sbatch"), "--config", "c.yaml"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)
    _, err = script.communicate(timeout=60)
    assert script.returncode == 0, err
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 4242", "step: USR1, saved", "scontrol requeue 4242"]


# ------------------------------------------------------------ the real thing
SRUN_STANDIN = """#!/bin/bash
# Stand-in srun: the job step's command once per "node" of the allocation, on this machine,
# with that node's SLURM_NODEID; forwards USR1/TERM to every node's task, as srun does.
while [[ "$1" == --* ]]; do shift; done
echo $$ > "$STEP_PID_FILE"
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$STEP_LOG_DIR/node$node.$SLURM_RESTART_COUNT.log" 2>&1 &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    [[ $rc -ne 0 ]] && status=$rc
done
exit $status
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submit(env: dict, config: Path, metrics: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(LAUNCH / "slurm_pretrain.sbatch"), "--config", str(config), "--cpu",
                             "--metrics-file", str(metrics)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sbatch_trains_on_two_nodes_saves_on_usr1_requeues_and_resumes(megatron_cpu, tmp_path):
    """launch/slurm_pretrain.sbatch for real on one machine: stand-in srun/scancel/scontrol,
    two "nodes" (one gloo rank each, torchrun's c10d rendezvous on localhost). Slurm's USR1
    before the time limit reaches the ranks, which save and exit; the script requeues; the
    requeued job resumes from the checkpoint and trains to the end. The final checkpoint is
    of the last step and the resumed losses are an uninterrupted run's."""
    import json

    import yaml

    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    total = 30
    sections = dict(model={"hidden_dropout": 0.0, "embedding_dropout": 0.0},
                    training={"train_iters": total, "lr_decay_iters": total, "eval_interval": 0, "micro_batch_size": 4},
                    parallel={"micro_batch_balance": "attention_cost"})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "cfg", **sections).to_dict(), sort_keys=False))
    bin_dir, logs, run_dir, calls = tmp_path / "bin", tmp_path / "steps", tmp_path / "run", tmp_path / "calls"
    bin_dir.mkdir()
    logs.mkdir()
    pid_file = tmp_path / "step.pid"
    _stub(bin_dir, "srun", SRUN_STANDIN.removeprefix("#!/bin/bash\n"))
    _stub(bin_dir, "scancel", f'echo "scancel $*" >> {calls}\nkill -USR1 "$(cat {pid_file})"\n')
    _stub(bin_dir, "scontrol", f'echo "scontrol $*" >> {calls}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5151", "SLURM_JOB_NAME": "e2e",
           "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "1",
           "MASTER_PORT": str(_free_port()), "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
           "SLURM_SUBMIT_DIR": str(REPO_ROOT), "STEP_PID_FILE": str(pid_file), "STEP_LOG_DIR": str(logs),
           "SLURM_RESTART_COUNT": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    metrics = run_dir / "metrics.jsonl"

    def steps() -> list[int]:
        if not metrics.exists():
            return []
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]

    first = _submit(env, config, metrics)
    deadline = time.time() + 400
    while not steps() or steps()[-1] < 2:
        assert first.poll() is None, f"the job ended before USR1: {first.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no training step within the time limit"
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1 before the time limit
    _, err = first.communicate(timeout=400)
    stopped = steps()[-1]
    assert stopped < total, "the signal came after the last step"
    # Each node's torchrun forwarded it (and then exits 1); the ranks saved and left (rank 0 says so).
    for node in (0, 1):
        assert "closing signal SIGUSR1" in (logs / f"node{node}.0.log").read_text(), err[-3000:]
    assert f"SIGUSR1 received at step {stopped}: exiting" in (logs / "node0.0.log").read_text()
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 5151", "scontrol requeue 5151"]
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)

    second = _submit({**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(_free_port())}, config, metrics)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(total)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert "resumed from step" in (logs / "node0.1.log").read_text()

    reference = tiny_config(tmp_path / "reference", **sections)
    Trainer(reference).train()
    expected = [json.loads(line)["loss"] for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["loss"] for r in records] == pytest.approx(expected, rel=1e-5)
