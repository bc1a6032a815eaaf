"""The lock of a run folder: one trainer at a time in RUN, also when RUN sits on a filesystem that several machines
share, where an OS file lock (flock) may hold on one machine only, or not at all.

The holder keeps a record in RUN/.lock: its host name, pid and process start time, its machine (boot and pid
namespace, where that pid means that process), its torchrun job (for the message) and a token unique to this
holding. The record is written whole under a temporary name and hard-linked into place: link(2) fails when the name
exists, also over NFS, so exactly one process creates it, and nobody reads it half-written. While the lock is held a
daemon thread touches the record (its mtime is the heartbeat) every HEARTBEAT_SECONDS. A process that finds a record
- from this machine: takes it over when its process is gone (a reused pid is told apart by its start time), else is
  refused, at once;
- from another machine, or unreadable: watches it, re-reading it every POLL_SECONDS, and is refused as soon as its
  heartbeat moves; it takes the record over once the heartbeat has stood still for LEASE_SECONDS (that machine
  crashed or lost RUN).
Nothing else vouches for a holder: neither a torchrun job id (a static rendezvous, `--master-port` without
`--rdzv-id`, gives every job the id "none" and the master 127.0.0.1:PORT, so two jobs on two machines look like one)
nor torchrun's promise that it stops every worker before restarting them. A restarted rank 0 on the same node takes
its dead predecessor's record over at once; one that moved to another node waits a lease.

Clocks. The lease is measured on the waiting process's own monotonic clock, between two readings of the heartbeat;
no timestamp written by another machine is ever compared with this one's. So it holds where the server stamps times
(NFS) and where each client stamps its own (Lustre, CephFS), with the clocks of the machines minutes apart or stepped:
a heartbeat counts when the mtime changes at all. It needs the filesystem to show another machine's touch within a
lease: NFS revalidates attributes on open (each reading opens the record) and caches them at most 60 s by default;
Lustre and CephFS are coherent. The price: a crashed machine's lock is taken over a full lease after a waiter first
looks at it, however long ago the crash was, and a second trainer elsewhere is refused within one heartbeat.

A takeover renames the stale record aside, checks it moved the record it judged (same file, same token, heartbeat
unchanged), else it links that one back, and then creates its own. What remains: should a third process create a
record in the instant between a mistaken rename and its link back, two processes hold the lock — which takes two
processes judging the same stale record in the same milliseconds, and a third starting then. A holder whose record
was taken over (a machine that lost RUN for a lease, then came back) stops its heartbeat; its training goes on unaware.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from scalegen.errors import UserError
from scalegen.files import write_failure

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 10.0  # how often the holder touches its record
LEASE_SECONDS = 120.0  # a record from another machine whose heartbeat stands still this long is a crashed holder's
POLL_SECONDS = 1.0  # how often a process waiting on another machine's record reads it again
NO_JOB = "none"  # torchrun's TORCHELASTIC_RUN_ID without --rdzv-id: shared by every such job, so it names none
PROC = Path("/proc")
BOOT_ID = PROC / "sys/kernel/random/boot_id"
START_TIME_FIELD = 19  # /proc/PID/stat: field 22 (starttime), counted after the ")" that closes the command name
GONE_STATES = ("Z", "X")  # a zombie or dead process holds nothing
HELD_LOCKS: dict[Path, int] = {}  # run folders this process holds the lock of, and how deeply


@dataclass(frozen=True)
class LockRecord:
    """Who holds a run folder's lock (the contents of RUN/.lock)."""

    host: str
    machine: str  # boot id and pid namespace: where `pid` names the same process ("" where unknown)
    pid: int
    started: str  # the process's start time on its machine ("" where unknown)
    job: str  # TORCHELASTIC_RUN_ID of a torchrun worker given --rdzv-id, "" otherwise; only for the message
    token: str  # unique to one holding

    def describe(self) -> str:
        """The holder in words, for the error message."""
        return f"process {self.pid} on {self.host}" + (f" (torchrun job {self.job})" if self.job else "")


@dataclass(frozen=True)
class Sighting:
    """A record from another machine as a waiting process first saw it."""

    inode: int  # which record (a takeover or a release and a new holder give another file)
    heartbeat: int  # its mtime in ns, compared only with later readings of itself
    since: float  # when it was first seen so, on this process's monotonic clock


def process_start(pid: int) -> str | None:
    """When a live process started ("" where /proc cannot tell), or None when there is no such live process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        fields = (PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None if PROC.is_dir() and not (PROC / str(pid)).exists() else ""
    return None if fields[0] in GONE_STATES else fields[START_TIME_FIELD]


def this_machine() -> str:
    """The boot id and pid namespace of this machine: two processes with the same value see the same pids."""
    try:
        return f"{BOOT_ID.read_text().strip()}/{os.readlink(PROC / 'self/ns/pid')}"
    except OSError:
        return ""


def own_record() -> LockRecord:
    """The record this process writes when it takes a lock."""
    pid, job = os.getpid(), os.environ.get("TORCHELASTIC_RUN_ID", "")
    return LockRecord(host=socket.gethostname(), machine=this_machine(), pid=pid, started=process_start(pid) or "",
                      job="" if job == NO_JOB else job, token=uuid.uuid4().hex)


def read_record(path: Path) -> tuple[LockRecord | None, os.stat_result]:
    """The record at `path` (None when unreadable) and its file's status (the mtime is the last heartbeat);
    FileNotFoundError when there is none."""
    with open(path, "rb") as stream:  # opening revalidates a network filesystem's cached attributes
        status = os.fstat(stream.fileno())
        text = stream.read()
    try:
        record = LockRecord(**json.loads(text))
    except (ValueError, TypeError):
        return None, status
    return (record if isinstance(record.pid, int) and record.pid > 0 else None), status


def same_machine(first: LockRecord, second: LockRecord) -> bool:
    """Whether two records come from one machine, where a pid names the same process."""
    return (first.host, first.machine) == (second.host, second.machine)


def is_gone(holder: LockRecord) -> bool:
    """Whether the process of a record from this machine has exited (a reused pid has another start time)."""
    start = process_start(holder.pid)
    return start is None or bool(holder.started and start and start != holder.started)


def create_record(path: Path, record: LockRecord) -> bool:
    """Put `record` at `path` unless a record is there. Returns whether it was created."""
    pending = path.with_name(f"{path.name}.{record.token}")
    try:
        with open(pending, "x") as stream:
            stream.write(json.dumps(asdict(record)))
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(pending, path)
        except FileExistsError:
            return False
        return True
    finally:
        pending.unlink(missing_ok=True)


def take_over(path: Path, judged: LockRecord | None, judged_status: os.stat_result, token: str) -> None:
    """Remove the stale record `judged` from `path`; a record that replaced it or beat in the meantime is put back."""
    aside = path.with_name(f"{path.name}.stale.{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process removed it first
    moved, status = read_record(aside)
    if (status.st_ino, status.st_mtime_ns, moved and moved.token) != \
            (judged_status.st_ino, judged_status.st_mtime_ns, judged and judged.token):
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()


def refuse(path: Path, holder: LockRecord | None, own: LockRecord) -> UserError:
    """The error for a run folder whose lock a live process holds."""
    who = holder.describe() if holder is not None else f"another process ({path} is unreadable)"
    lapse = "" if holder is not None and same_machine(holder, own) else \
        f" (a crashed machine's lock is taken over once its heartbeat has stood still for {LEASE_SECONDS:.0f} s)"
    return UserError(f"{path.parent} is in use by {who}; wait for it to finish or choose another --out{lapse}")


def acquire(path: Path, own: LockRecord) -> None:
    """Create this process's record at `path`, taking over stale ones; a UserError when a live process holds it."""
    sighting: Sighting | None = None
    while True:
        if create_record(path, own):
            return
        try:
            holder, status = read_record(path)
        except FileNotFoundError:
            continue  # released in the meantime
        if holder is not None and holder.token == own.token:
            return  # the link went through but its reply was lost (NFS)
        if holder is not None and same_machine(holder, own):
            if not is_gone(holder):
                raise refuse(path, holder, own)
            take_over(path, holder, status, own.token)
            continue
        now = time.monotonic()
        if sighting is None or sighting.inode != status.st_ino:
            if sighting is None:
                who = holder.describe() if holder is not None else "an unreadable record"
                print(f"{path} is held by {who} on another machine; watching its heartbeat for up to "
                      f"{LEASE_SECONDS:.0f} s", file=sys.stderr, flush=True)
            sighting = Sighting(inode=status.st_ino, heartbeat=status.st_mtime_ns, since=now)
        elif status.st_mtime_ns != sighting.heartbeat:
            raise refuse(path, holder, own)  # it beat while watched: alive
        elif now - sighting.since >= LEASE_SECONDS:
            take_over(path, holder, status, own.token)
            continue
        time.sleep(POLL_SECONDS)


def keep_alive(path: Path, token: str, stop: threading.Event) -> None:
    """Touch the record at `path` every HEARTBEAT_SECONDS while it is still this holding's."""
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            holder, _ = read_record(path)
            if holder is None or holder.token != token:
                return  # taken over: the heartbeat would now vouch for someone else
            os.utime(path)
        except OSError:
            continue  # a network filesystem's hiccup, or a takeover checking its judgement: the next beat tries again


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the lock of run folder `run_dir` while inside; re-entrant within one process.

    A second process on the same run folder, on this machine or another that shares the folder, gets a one-line
    error naming the process that holds it. Leaving removes the record if it is still this process's.
    """
    root = Path(run_dir)
    key = root.resolve()
    if key in HELD_LOCKS:
        HELD_LOCKS[key] += 1
        try:
            yield
        finally:
            HELD_LOCKS[key] -= 1
        return
    path, own = root / LOCK_FILE, own_record()
    try:
        root.mkdir(parents=True, exist_ok=True)
        acquire(path, own)
    except OSError as error:
        raise UserError(f"cannot use {root} as a run folder ({write_failure(error)}); choose a writable --out"
                        ) from None
    stop = threading.Event()
    heartbeat = threading.Thread(target=keep_alive, args=(path, own.token, stop), daemon=True, name="run-lock")
    heartbeat.start()
    HELD_LOCKS[key] = 1
    try:
        yield
    finally:
        del HELD_LOCKS[key]
        stop.set()
        heartbeat.join()
        release(path, own.token)


def release(path: Path, token: str) -> None:
    """Remove the record at `path` if it is still this holding's."""
    try:
        holder, _ = read_record(path)
    except FileNotFoundError:
        return
    if holder is not None and holder.token == token:
        path.unlink(missing_ok=True)
