"""Two nodes and a shared run folder: two torchrun agents rendezvous on localhost, train, checkpoint, and carry on
from the last checkpoint after torchrun restarts a killed worker, the restarted rank 0 taking over the run lock its
killed predecessor left (the lock across machines: tests/runs/test_run_lock.py)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalegen.runs.folder import last_checkpoint
from scalegen.runs.lock import LOCK_FILE
from tests_support import TESTS, without_progress_bars, write_fashion_subset

pytestmark = pytest.mark.multiprocess  # two torchrun agents
SOURCES = TESTS.parent / "src"
TINY_DIT = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
            "--image-size", "8", "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "1",
            "--sample-steps", "2", "--device", "cpu", "--precision", "fp32"]
AGENTS = 2
LAUNCH_TIMEOUT = 300  # seconds, a generous bound on 2 busy cores


def free_port() -> int:
    """A port nothing listens on now (the rendezvous endpoint)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_agents(tmp_path: Path, run: Path, steps: int) -> list[tuple[subprocess.Popen, Path]]:
    """Two torchrun agents, as on two nodes, training a tiny DiT into `run`; each one's output goes to a file."""
    data = tmp_path / "data" if (tmp_path / "data").exists() else write_fashion_subset(tmp_path / "data")
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(TESTS), str(SOURCES), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={AGENTS}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={run.name}",
               "--max-restarts=1", "--monitor-interval=0.2",
               "-m", "scalegen", "train", "dit", *TINY_DIT, "--data", str(data), "--steps", str(steps),
               "--out", str(run)]
    agents = []
    for number in range(AGENTS):
        output = tmp_path / f"{run.name}-agent-{number}.log"
        with open(output, "w") as stream:
            agents.append((subprocess.Popen(command, env=environment, stdout=stream, stderr=subprocess.STDOUT), output))
    return agents


def finish(agents: list[tuple[subprocess.Popen, Path]]) -> str:
    """Wait for the agents; each must succeed. Returns their output."""
    outputs = []
    for agent, output in agents:
        try:
            agent.wait(timeout=LAUNCH_TIMEOUT)
        finally:
            agent.kill()
        outputs.append(output.read_text())
        assert agent.returncode == 0, without_progress_bars(outputs[-1])[-3000:]
    return "\n".join(outputs)


def workers(agent: subprocess.Popen) -> dict[int, dict[str, str]]:
    """The worker processes an agent started, with their environments."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
            if parent == agent.pid:
                variables = (stat.parent / "environ").read_text().split("\0")
                found[int(stat.parent.name)] = dict(item.split("=", 1) for item in variables if "=" in item)
        except OSError:
            continue  # gone meanwhile
    return found


def assert_finished_cleanly(run: Path, steps: int) -> None:
    assert last_checkpoint(run).name == f"step-{steps:07d}"
    assert not [path.name for path in run.iterdir() if path.name.startswith(LOCK_FILE)]  # no lock record left
    assert not list((run / "checkpoints").glob(".staging-*"))


def test_two_torchrun_agents_rendezvous_on_localhost_and_train(tmp_path):
    run = tmp_path / "run"
    output = finish(start_agents(tmp_path, run, steps=4))
    assert "2 process(es)" in output and "done: steps 0 → 4" in output
    assert_finished_cleanly(run, 4)


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_goes_on_from_its_last_checkpoint(tmp_path):
    run, steps = tmp_path / "run", 60
    agents = start_agents(tmp_path, run, steps)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (run / "last.json").exists():
        assert time.monotonic() < deadline and all(agent.poll() is None for agent, _ in agents), finish(agents)
        time.sleep(0.05)
    # Kill rank 0, the lock's holder, as the machine would: no clean-up runs, its lock record stays behind.
    holder = [pid for agent, _ in agents for pid, variables in workers(agent).items() if variables.get("RANK") == "0"]
    assert len(holder) == 1
    os.kill(holder[0], signal.SIGKILL)
    output = finish(agents)
    resumed = [int(line.split("from step ")[1].split()[0]) for line in output.splitlines() if "resuming" in line]
    assert len(resumed) == 1 and 2 <= resumed[0] < steps, output[-3000:]  # the kill landed mid-run
    assert f"done: steps {resumed[0]} → {steps}" in output
    assert_finished_cleanly(run, steps)
