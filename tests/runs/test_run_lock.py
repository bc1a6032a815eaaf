"""The run lock (scalegen.runs.lock): one trainer at a time in a run folder, also across machines that share it.
Records are planted as another holder would have written them (of this machine or another, dead or alive, of a
torchrun job or none); a holder on another machine is alive while a thread touches its record, stamped on that
machine's own clock, as a client-stamped filesystem (Lustre, CephFS) would."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from scalegen.errors import UserError
from scalegen.runs import lock as lock_module
from scalegen.runs.lock import (LEASE_SECONDS, LOCK_FILE, LockRecord, own_record, process_start, read_record, run_lock,
                                take_over)

OTHER_MACHINE = dict(host="another-node", machine="elsewhere", pid=1)
STATIC_RENDEZVOUS = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
TORCHRUN_JOB = {"TORCHELASTIC_RUN_ID": "job-7", "MASTER_ADDR": "node-0", "MASTER_PORT": "29500"}
BEAT_SECONDS = 0.05  # how often a planted live holder touches its record
LONG_LEASE = 30.0  # seconds: a live holder beats hundreds of times within it, however busy this machine is
SHORT_LEASE = 0.5  # seconds: what a waiter watches a stopped heartbeat for before it takes the record over
CLOCK_SKEW = 600.0  # seconds: another machine's clock ten minutes off ours


@pytest.fixture(autouse=True)
def quick_lock(monkeypatch):
    """Heartbeats and polls in tens of milliseconds, and a lease long enough that a live holder always beats."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", BEAT_SECONDS)
    monkeypatch.setattr(lock_module, "POLL_SECONDS", BEAT_SECONDS / 2)
    monkeypatch.setattr(lock_module, "LEASE_SECONDS", LONG_LEASE)


def plant(run: Path, **fields) -> LockRecord:
    """Write a lock record as another holder would have (this process's record with `fields` replaced)."""
    run.mkdir(parents=True, exist_ok=True)
    record = replace(own_record(), token="planted", **fields)
    (run / LOCK_FILE).write_text(json.dumps(asdict(record)))
    return record


@contextmanager
def beating(path: Path, skew: float = 0.0) -> Iterator[None]:
    """A live holder on another machine while inside: it touches `path` every BEAT_SECONDS, stamping the time of its
    own clock, `skew` seconds off ours."""
    stop = threading.Event()

    def beat() -> None:
        stamp = time.time() + skew
        try:
            os.utime(path, (stamp, stamp))
        except FileNotFoundError:
            pass  # moved aside for a moment by a takeover

    def keep_beating() -> None:
        while not stop.wait(BEAT_SECONDS):
            beat()

    beat()  # stamped on that machine's clock from the start
    thread = threading.Thread(target=keep_beating, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
        [sys.executable, "-c", "import sys, time\nfrom scalegen.runs.lock import run_lock\n"
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


@pytest.mark.parametrize("holder_machine", ["this machine", "another machine"])
def test_two_static_rendezvous_jobs_sharing_a_folder_the_second_is_refused_while_the_first_lives(
        tmp_path, monkeypatch, holder_machine):
    # Both jobs started with an explicit --master-port: TORCHELASTIC_RUN_ID is "none", the master 127.0.0.1:29500.
    for name, value in STATIC_RENDEZVOUS.items():
        monkeypatch.setenv(name, value)
    assert own_record().job == ""  # "none" names no job
    parent = os.getppid()
    alive = dict(pid=parent, started=process_start(parent)) if holder_machine == "this machine" else OTHER_MACHINE
    plant(tmp_path, **alive)
    with beating(tmp_path / LOCK_FILE), pytest.raises(UserError, match=f"in use by process {alive['pid']} on "):
        with run_lock(tmp_path):
            pass
    assert holder_inside(tmp_path).token == "planted"


def test_a_torchrun_restart_takes_over_its_dead_holder_at_once_and_a_moved_rank_0_once_its_heartbeat_stopped(
        tmp_path, monkeypatch):
    for name, value in TORCHRUN_JOB.items():
        monkeypatch.setenv(name, value)
    plant(tmp_path, pid=dead_pid(), started="")  # rank 0 of the previous attempt, on this node, stopped by torchrun
    started = time.monotonic()
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    assert time.monotonic() - started < LONG_LEASE / 2  # at once: nothing to watch
    # Rank 0 moved to another node: its old record is taken over once its heartbeat has not moved for a lease.
    monkeypatch.setattr(lock_module, "LEASE_SECONDS", SHORT_LEASE)
    plant(tmp_path, **OTHER_MACHINE)
    started = time.monotonic()
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    assert time.monotonic() - started >= SHORT_LEASE


@pytest.mark.parametrize("skew", [-CLOCK_SKEW, 0.0, CLOCK_SKEW])
def test_another_machines_holder_is_kept_while_its_heartbeat_moves_and_taken_over_once_it_stops_whatever_its_clock(
        tmp_path, monkeypatch, skew):
    plant(tmp_path, **OTHER_MACHINE)
    with beating(tmp_path / LOCK_FILE, skew):
        with pytest.raises(UserError, match=f"in use by process 1 on {OTHER_MACHINE['host']};"):
            with run_lock(tmp_path):
                pass
        assert holder_inside(tmp_path).token == "planted"
    monkeypatch.setattr(lock_module, "LEASE_SECONDS", SHORT_LEASE)  # that machine crashed
    started = time.monotonic()
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()
    assert time.monotonic() - started >= SHORT_LEASE  # judged on our clock: watched for a whole lease


def test_an_unreadable_record_is_refused_while_it_changes_and_taken_over_once_it_stops(tmp_path, monkeypatch):
    tmp_path.joinpath(LOCK_FILE).write_text("{not json")
    with beating(tmp_path / LOCK_FILE), pytest.raises(UserError, match="unreadable"):
        with run_lock(tmp_path):
            pass
    monkeypatch.setattr(lock_module, "LEASE_SECONDS", SHORT_LEASE)
    with run_lock(tmp_path):
        assert holder_inside(tmp_path).pid == os.getpid()


def test_a_takeover_puts_back_a_record_that_beat_after_it_was_judged(tmp_path):
    plant(tmp_path, **OTHER_MACHINE)
    path = tmp_path / LOCK_FILE
    judged, status = read_record(path)
    os.utime(path, (status.st_mtime + 1,) * 2)  # its holder beat between the judgement and the takeover
    take_over(path, judged, status, "waiter")
    assert holder_inside(tmp_path).token == "planted" and sorted(tmp_path.iterdir()) == [path]
    judged, status = read_record(path)
    take_over(path, judged, status, "waiter")
    assert not list(tmp_path.iterdir())


def test_the_holder_keeps_its_heartbeat_and_leaves_a_record_it_no_longer_owns(tmp_path):
    path = tmp_path / LOCK_FILE
    with run_lock(tmp_path):
        for _ in range(2):
            lapsed = time.time() - LEASE_SECONDS
            os.utime(path, (lapsed, lapsed))
            time.sleep(10 * BEAT_SECONDS)
            assert path.stat().st_mtime > lapsed + LEASE_SECONDS / 2
            path.rename(tmp_path / "aside")  # moved aside for a moment by a takeover that then puts it back
            time.sleep(4 * BEAT_SECONDS)
            (tmp_path / "aside").rename(path)
        plant(tmp_path, **OTHER_MACHINE)  # taken over meanwhile (a machine that lost RUN for a lease)
        time.sleep(4 * BEAT_SECONDS)
    assert holder_inside(tmp_path).host == OTHER_MACHINE["host"]
