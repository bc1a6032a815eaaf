"""Preemption-safe stops: SIGTERM, SIGINT and SIGUSR1 stop training at a step boundary with a checkpoint written,
the command says where and exits with 128 + the signal's number, and a re-run resumes there; torchrun ranks agree on
the step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalegen.cli.main import main
from scalegen.distributed import DistributedContext
from scalegen.runs.folder import RunFolder, last_checkpoint
from scalegen.runs.weights import load_weights
from scalegen.train.stopping import AGREEMENT_EVERY, SIGNAL_EXIT_BASE, STOP_SIGNALS, Interrupted, StopSignals
from tests_support import write_fashion_subset

NEVER_REACHED = 100_000  # --steps of a run that only a signal ends, and its --checkpoint-every
TINY_RUN = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
            "--image-size", "8", "--batch-size", "8", "--sample-steps", "2", "--checkpoint-every", str(NEVER_REACHED),
            "--log-every", "1", "--device", "cpu", "--precision", "fp32"]
STEPS_BEFORE_SIGNAL = 3  # progress lines (one per step) to wait for before signalling
STARTUP_SECONDS = 120  # the longest wait for a launch's first steps on a busy machine


def default_stop_signals() -> None:
    """In the child before it runs: the stop signals' default handling, as a job started from a terminal has (a suite
    run in the background of a non-interactive shell hands its children SIGINT ignored, which training respects)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_DFL)


def launch(command: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    """Start `command` in a session of its own (so it can be signalled as a terminal or SLURM signals: its whole
    process group) with its output in files; returns the process and its stderr file."""
    stderr = folder / "stderr.txt"
    with open(folder / "stdout.txt", "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=default_stop_signals)
    return process, stderr


def wait_for_steps(process: subprocess.Popen, run: Path, stderr: Path) -> None:
    """Wait until the run has logged STEPS_BEFORE_SIGNAL steps in RUN/progress.log."""
    deadline = time.monotonic() + STARTUP_SECONDS
    progress = RunFolder(run).progress
    while not progress.exists() or len(progress.read_text().splitlines()) < STEPS_BEFORE_SIGNAL:
        assert process.poll() is None, stderr.read_text()[-4000:]
        assert time.monotonic() < deadline, "no training steps in time"
        time.sleep(0.1)


def stop_lines(stderr: Path) -> list[str]:
    """The `scalegen: stopped by …` lines of a stopped run's stderr."""
    return [line for line in stderr.read_text().splitlines() if line.startswith("scalegen: stopped by")]


@pytest.mark.end_to_end
@pytest.mark.parametrize("signal_number", STOP_SIGNALS, ids=lambda number: signal.Signals(number).name)
def test_a_signal_stops_training_with_a_checkpoint_that_a_rerun_resumes(tmp_path, capsys, signal_number):
    data, run = write_fashion_subset(tmp_path), tmp_path / "run"
    arguments = ["train", "dit", *TINY_RUN, "--data", str(data), "--out", str(run)]
    # One loader worker: it gets the signal too (the process group is signalled) and must not fail the run.
    process, stderr = launch([sys.executable, "-m", "scalegen", *arguments, "--steps", str(NEVER_REACHED),
                              "--num-workers", "1"], tmp_path)
    try:
        wait_for_steps(process, run, stderr)
        os.killpg(process.pid, signal_number)
        assert process.wait(timeout=STARTUP_SECONDS) == SIGNAL_EXIT_BASE + signal_number, stderr.read_text()[-4000:]
    finally:
        process.kill()
    checkpoint = last_checkpoint(run)  # complete, or this raises
    step = json.loads(RunFolder(run).last_pointer.read_text())["step"]
    assert STEPS_BEFORE_SIGNAL <= step < NEVER_REACHED and checkpoint.name.endswith(f"{step:07d}")
    load_weights(run)
    last_line = stderr.read_text().strip().splitlines()[-1]
    assert last_line.startswith(f"scalegen: stopped by {signal.Signals(signal_number).name} at step {step};")
    assert str(checkpoint) in last_line and "re-run the same command" in last_line
    capsys.readouterr()
    main([*arguments, "--steps", str(step + 1)])
    assert f"steps {step} → {step + 1}" in capsys.readouterr().out  # resumed: one step trained, not step + 1
    assert last_checkpoint(run).name.endswith(f"{step + 1:07d}")


@pytest.mark.multiprocess
def test_torchrun_ranks_stop_at_the_same_step_when_one_of_them_is_signalled(tmp_path):
    """SIGTERM to rank 1 alone: rank 0 learns of it and stops at the same step. FSDP: every rank writes its shards of
    the checkpoint, in the background. (SIGTERM to torchrun's agent reaches every worker at once: it forwards it.)"""
    data, run = write_fashion_subset(tmp_path), tmp_path / "run"
    process, stderr = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "scalegen", "train", "dit", *TINY_RUN, "--data", str(data), "--steps",
                              str(NEVER_REACHED), "--fsdp", "--out", str(run)], tmp_path)
    try:
        wait_for_steps(process, run, stderr)
        os.kill(worker_pid(process.pid, rank=1), signal.SIGTERM)
        process.wait(timeout=STARTUP_SECONDS)  # torchrun reports its workers' exit codes as a failure
    finally:
        process.kill()
    step = json.loads(RunFolder(run).last_pointer.read_text())["step"]
    assert step % AGREEMENT_EVERY == 0  # where the ranks agree
    assert [folder.name for folder in RunFolder(run).checkpoints.iterdir()] == [last_checkpoint(run).name]
    load_weights(run)  # complete: both ranks' shards are there
    lines = stop_lines(stderr)
    # Once one rank has exited, torchrun ends the other, which may then die before it prints its own line.
    assert lines, stderr.read_text()[-4000:]
    assert all(line.startswith(f"scalegen: stopped by SIGTERM at step {step};") for line in lines), lines


def worker_pid(agent: int, rank: int) -> int:
    """The process id of torchrun worker `rank`, a child of the agent process `agent` (read from /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            environment = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:  # a process that ended meanwhile
            continue
        if int(parent.split()[1]) == agent and f"RANK={rank}".encode() in environment:
            return int(status.parent.name)
    raise AssertionError(f"no worker of rank {rank} under process {agent}")


def test_the_handlers_note_a_signal_let_a_second_ctrl_c_through_and_are_restored():
    # Ctrl-C as a Python started from a terminal handles it (a suite run in the background inherits it ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = [signal.getsignal(number) for number in STOP_SIGNALS]
        with StopSignals(DistributedContext()) as stop:
            assert not stop.stopping(1, last=False)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.stopping(2, last=False) and stop.signal_number == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGINT)  # noted (the first signal stays the one it stops on)
            assert stop.stopping(3, last=False) and stop.signal_number == signal.SIGUSR1
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C interrupts at once
                time.sleep(1)
        assert [signal.getsignal(number) for number in STOP_SIGNALS] == before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_hard_interrupt_claims_no_checkpoint_that_does_not_exist(tmp_path):
    message = str(Interrupted(7, RunFolder(tmp_path)))
    assert "at step 7" in message and "no checkpoint was written yet" in message
