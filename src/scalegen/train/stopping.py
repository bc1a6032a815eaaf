"""Preemption-safe stops: SIGTERM, SIGINT and SIGUSR1 end training at a step boundary with a checkpoint written.

Clusters warn before they kill: SLURM sends SIGTERM at the time limit or on preemption (SIGUSR1 too, with
`--signal=USR1@SECONDS`), Kubernetes sends SIGTERM at the start of its grace period, and Ctrl-C is SIGINT. torchrun's
agent forwards the SIGTERM or SIGINT it gets to its workers and kills them `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds
later (30 by default); it forwards SIGUSR1 only when started with `--signals-to-handle=SIGTERM,SIGINT,SIGUSR1`,
else it dies of it and leaves its workers running.

While the loop runs (`StopSignals` as a context manager, in the main thread) those signals only raise a flag. At each
step boundary the trainer asks `StopSignals.stopping(step)`: a single process stops at the next boundary; under
torchrun the ranks agree every `AGREEMENT_EVERY` steps (one all-reduce of a CPU flag on a gloo group of its own, no
device sync), so every rank stops at the same step, at most that many steps after the signal. The trainer then writes
a checkpoint and raises `StoppedBySignal`, which the command line prints as one line and turns into exit code
128 + the signal's number (the shell's convention: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1). A second SIGINT
interrupts at once (KeyboardInterrupt, as `Interrupted`).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from scalegen.distributed import DistributedContext
from scalegen.runs.folder import RunFolder

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
AGREEMENT_EVERY = 10  # steps between the ranks' agreements on stopping under torchrun (a single process: every step)
SIGNAL_EXIT_BASE = 128  # a process ended by signal N exits with 128 + N (the shell's convention)


def resume_hint(run: RunFolder) -> str:
    """What a re-run of the same command does: resume from the checkpoint `last.json` names, or start afresh."""
    checkpoint = run.pointed_checkpoint() if run.last_pointer.exists() else None
    if checkpoint is None:
        return "no checkpoint was written yet; re-running the same command starts afresh"
    return f"checkpoint {checkpoint}; re-run the same command to resume from it"


class StoppedBySignal(Exception):
    """Training stopped at a step boundary on a signal, with a checkpoint written; the message says where it is and
    how to resume.

    Attributes:
        signal_number: the signal that stopped it (the largest number where the ranks got different ones).
        exit_code: 128 + `signal_number`, the command line's exit code.
    """

    def __init__(self, signal_number: int, step: int, run: RunFolder):
        super().__init__(f"stopped by {signal.Signals(signal_number).name} at step {step}; {resume_hint(run)}")
        self.signal_number = signal_number
        self.exit_code = SIGNAL_EXIT_BASE + signal_number


class Interrupted(KeyboardInterrupt):
    """A hard interrupt of training (a second Ctrl-C, or one outside the loop); the message says what is on disk."""

    def __init__(self, step: int, run: RunFolder):
        super().__init__(f"interrupted at step {step}; {resume_hint(run)}")


class StopSignals:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a stop at a step boundary that every rank agrees on.

    Use it as a context manager around the training loop: it installs its handlers in the main thread (elsewhere
    Python delivers no signals, and it installs none) and restores the previous ones after. A signal the process
    ignores (SIG_IGN, e.g. SIGINT of a job started in the background) stays ignored.

    Attributes:
        signal_number: once `stopping` said yes, the signal the ranks stop on; None before.
    """

    def __init__(self, context: DistributedContext):
        """Every rank creates it (under torchrun its gloo group is made with a collective)."""
        self.context = context
        self.received: int | None = None  # the first stop signal this rank got
        self.signal_number: int | None = None
        self.previous: dict[int, object] = {}  # the handlers to restore
        self.group = dist.new_group(backend="gloo") if context.enabled else None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self.previous[number] = signal.signal(number, self.catch)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self.previous.items():  # None: a handler not set from Python, i.e. the default
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def catch(self, number: int, frame: FrameType | None) -> None:
        """The handler: only notes the signal (a second SIGINT then interrupts at once)."""
        if self.received is None:
            self.received = number
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def stopping(self, step: int, last: bool) -> bool:
        """Whether to stop after optimizer step `step` (`last`: the run's final step, where the ranks agree too).

        A single process answers from its own flag; torchrun ranks answer at the steps where they agree (every
        `AGREEMENT_EVERY`-th, and the last), the same on every rank, False in between.
        """
        if not self.context.enabled:
            self.signal_number = self.received
        elif step % AGREEMENT_EVERY == 0 or last:
            flag = torch.tensor([self.received or 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            self.signal_number = int(flag.item()) or None
        return self.signal_number is not None


def ignore_stop_signals(worker_id: int) -> None:
    """A data loader worker's start (`worker_init_fn`, any `worker_id`): it ignores the stop signals, which are the
    training process's to act on.

    SLURM signals every process of a job step and Ctrl-C the terminal's whole process group; a worker that died of
    the signal would fail the run before it reached its checkpoint. A worker still ends with its training process.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
