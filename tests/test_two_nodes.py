"""Two nodes and a shared run folder: the run lock holds across machines that share RUN (records faked as another
host's, dead or alive, fresh or lapsed, of this torchrun job or another), and two torchrun agents rendezvous on
localhost, train, checkpoint, and carry on from the last checkpoint after torchrun restarts a killed worker."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from scalegen import run_lock as run_lock_module
from scalegen.checkpoint import last_checkpoint
from scalegen.errors import UserError
from scalegen.run_lock import LEASE_SECONDS, LOCK_FILE, LockRecord, own_record, process_start, read_record, run_lock
from tests_support import without_progress_bars, write_fashion_subset

TESTS = Path(__file__).parent
SOURCES = TESTS.parent / "src"
OTHER_HOST = "another-node"
TORCHRUN_JOB = {"TORCHELASTIC_RUN_ID": "job-7", "MASTER_ADDR": "node-0", "MASTER_PORT": "29500"}


def plant(run: Path, age: float = 0.0, **fields) -> LockRecord:
    """Write a lock record as another holder would have, its last heartbeat `age` seconds ago."""
    run.mkdir(parents=True, exist_ok=True)
    record = replace(own_record(), token="planted", **fields)
    path = run / LOCK_FILE
    path.write_text(json.dumps(asdict(record)))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return record


def holder_inside(run: Path) -> LockRecord:
    """The record of whoever holds `run` now."""
    record, _ = read_record(run / LOCK_FILE)
    return record


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_holder_on_this_machine_is_refused_and_a_dead_or_replaced_one_is_taken_over(tmp_path):
    parent = os.getppid()
    plant(tmp_path, pid=parent, started=process_start(parent))
    with pytest.raises(UserError, match=f"in use by process {parent} on {socket.gethostname()};"):
        with run_lock(tmp_path):
            pass
    for holder in (dict(pid=dead_pid(), started=""), dict(pid=parent, started="1")):  # gone; its pid reused
        plant(tmp_path, **holder)
        with run_lock(tmp_path):
            assert holder_inside(tmp_path).pid == os.getpid()
            with run_lock(tmp_path):  # re-entrant within one process
                pass
            assert holder_inside(tmp_path).pid == os.getpid()
        assert not (tmp_path / LOCK_FILE).exists()


def test_a_killed_holder_process_leaves_a_record_that_the_next_trainer_takes_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom scalegen.run_lock import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} "):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert holder_inside(tmp_path).pid == holder.pid  # SIGKILL: no clean-up ran
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_another_machines_record_holds_while_its_heartbeat_is_fresh(tmp_path):
    plant(tmp_path, age=LEASE_SECONDS / 2, host=OTHER_HOST, pid=1)
    with pytest.raises(UserError, match=f"in use by process 1 on {OTHER_HOST};.*lapses"):
        with run_lock(tmp_path):
            pass
    plant(tmp_path, age=LEASE_SECONDS + 10, host=OTHER_HOST, pid=1)  # that machine crashed
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    (tmp_path / LOCK_FILE).write_text("{not json")  # a record nobody can read lapses the same way
    with pytest.raises(UserError, match="unreadable"):
        with run_lock(tmp_path):
            pass
    os.utime(tmp_path / LOCK_FILE, (time.time() - LEASE_SECONDS - 10,) * 2)
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()


def test_a_restarted_torchrun_worker_takes_over_its_own_jobs_record_from_another_node(tmp_path, monkeypatch):
    master = f"{TORCHRUN_JOB['MASTER_ADDR']}:{TORCHRUN_JOB['MASTER_PORT']}"
    other_node = dict(host=OTHER_HOST, machine="elsewhere", pid=1)
    plant(tmp_path, job=TORCHRUN_JOB["TORCHELASTIC_RUN_ID"], master=master, **other_node)
    with pytest.raises(UserError, match="torchrun job job-7"):  # a plain process is not of that job
        with run_lock(tmp_path):
            pass
    for name, value in TORCHRUN_JOB.items():
        monkeypatch.setenv(name, value)
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    plant(tmp_path, job="another-job", master=master, **other_node)
    with pytest.raises(UserError, match="torchrun job another-job"):
        with run_lock(tmp_path):
            pass
    # Rank 0 moved to another node, so the master differs: wait for the old heartbeat to lapse (a short lease here).
    monkeypatch.setattr(run_lock_module, "LEASE_SECONDS", 0.5)
    monkeypatch.setattr(run_lock_module, "POLL_SECONDS", 0.1)
    plant(tmp_path, job=TORCHRUN_JOB["TORCHELASTIC_RUN_ID"], master="node-1:29400", **other_node)
    started = time.monotonic()
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    assert 0.3 < time.monotonic() - started < 5


def test_the_holder_keeps_its_heartbeat_and_leaves_a_record_it_no_longer_owns(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock_module, "HEARTBEAT_SECONDS", 0.05)
    with run_lock(tmp_path):
        lapsed = time.time() - LEASE_SECONDS
        os.utime(tmp_path / LOCK_FILE, (lapsed, lapsed))
        time.sleep(0.5)
        assert (tmp_path / LOCK_FILE).stat().st_mtime > lapsed + LEASE_SECONDS / 2
        plant(tmp_path, host=OTHER_HOST, pid=1)  # taken over meanwhile (a machine that lost RUN for a lease)
        time.sleep(0.2)
    assert holder_inside(tmp_path).host == OTHER_HOST


# ----- two torchrun agents on this machine -----

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
