"""The sharded checkpoint format (a `Shard` run's, FSDP2): every rank writes its shards of the model, the EMA and the
optimizer with torch.distributed.checkpoint (DCP), in the background while training goes on, into the staging folder
rank 0 made and wrote config.json and training_state.pt into; rank 0 renames the folder into place once the last
shard is written (DCP writes its index last), then moves `last.json` and prunes, as `save_checkpoint` does for
one-file checkpoints (see runs/folder.py's layout).

A run resumes from it at any world size, sharded or not (DCP reshards); `runs.weights.load_weights` reads it as full
tensors in one process.
"""
from __future__ import annotations

import inspect
import pickle
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.files import fsync_path
from scalegen.runs.checkpoints import CheckpointFormat, CheckpointTarget, register_format
from scalegen.runs.folder import (
    SHARDED_DIR, SINGLE_PROCESS_WARNING, RunFolder, failed_checkpoint, holds_ema, is_sharded, move_into_place, prune,
    staging_folder, write_state_files,
)

KEPT_STAGER = "async_stager" in inspect.signature(dcp.async_save).parameters  # torch ≥ 2.8: a stager to keep


def root_error(error: BaseException) -> BaseException:
    """The first failed rank's own error inside DCP's `CheckpointException`, or the error itself."""
    failures = getattr(error, "failures", None)
    if not failures:
        return error
    failure = next(iter(failures.values()))
    return failure[0] if isinstance(failure, tuple) else failure  # DCP keeps (error, traceback) pairs


@dataclass
class PendingCheckpoint:
    """A sharded checkpoint being written: its staging folder, its step and, written in the background, the future
    of this rank's write (None once written)."""

    staging: Path
    step: int
    write: Future | None


@register_format
class ShardedFormat(CheckpointFormat):
    """Writes a checkpoint as each rank's shards, with DCP.

    Asynchronous (`dcp.async_save`; `asynchronous=False` writes before `write` returns): a rank returns to training
    once its shards are copied to host memory while a thread writes them; `poll` (every step: no collective) and
    `wait` (before the next save) finish it, `close` (at the end) too, and frees the host copy.
    """

    name = "sharded"

    def __init__(self, run: RunFolder, keep: int, context: DistributedContext, asynchronous: bool = True):
        super().__init__(run, keep, context)
        self.asynchronous = asynchronous
        # DCP's collectives on a gloo group of their own: a background write never interleaves with training's, and
        # a GPU run's NCCL group has no CPU side (torch's advice for async_save). Every rank creates it here.
        self.group = dist.new_group(backend="gloo")
        self.pending: PendingCheckpoint | None = None
        # Kept across saves, the stager copies the shards into the same host memory each time instead of fresh pages
        # (faulting those in is most of a CPU run's stall); older torch allocates a new copy at each save.
        self.stager = dcp.staging.DefaultStager(dcp.staging.StagingOptions(
            use_pinned_memory=context.device.type == "cuda", use_shared_memory=False, use_async_staging=False,
            use_non_blocking_copy=False)) if asynchronous and KEPT_STAGER else None

    @classmethod
    def is_mine(cls, folder: Path) -> bool:
        return is_sharded(folder)

    def write(self, step: int, config: dict, state: dict, training_state: dict,
              task_weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Start checkpoint `step` once the previous one is finished: rank 0 writes `config` and `training_state`
        (read on rank 0 only), every rank its `state` (its shards; `task_weights` is empty: the tasks refuse
        end-to-end training with --fsdp)."""
        self.wait()
        staging, problem = None, None
        if self.context.is_main:
            try:
                staging = staging_folder(self.run)
                write_state_files(staging, config, training_state)
            except (OSError, RuntimeError) as error:
                problem = str(failed_checkpoint(self.run, step, staging, error))
        shared = [staging, problem]  # every rank writes into rank 0's staging folder, or stops with its error
        dist.broadcast_object_list(shared, src=0, group=self.group)
        staging, problem = shared
        if problem is not None:
            raise UserError(problem)
        try:
            if self.asynchronous:
                stager = {"async_stager": self.stager} if self.stager is not None else {}
                write = dcp.async_save(state, checkpoint_id=staging / SHARDED_DIR, process_group=self.group, **stager)
            else:
                write = None
                dcp.save(state, checkpoint_id=staging / SHARDED_DIR, process_group=self.group)
        except (dcp.CheckpointException, OSError, RuntimeError) as error:
            raise self.failure(step, staging, error) from None
        self.pending = PendingCheckpoint(staging, step, write)
        if write is None:
            self.finish()

    @classmethod
    def read_into(cls, folder: Path, training_state: dict, target: CheckpointTarget) -> None:
        """Every rank of a launch reads its part (a single process alone, without a process group); a checkpoint
        without EMA starts the EMA from its weights."""
        reader = dcp.FileSystemReader(folder / SHARDED_DIR)
        try:
            has_ema = holds_ema(reader.read_metadata().state_dict_metadata)
            state = target.distributed_state(has_ema)
            with warnings.catch_warnings():  # a single process is the intent, and torch says it assumes so
                warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
                dcp.load(state, storage_reader=reader)
        except (dcp.CheckpointException, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise UserError(f"cannot read the shards of {folder} ({str(root_error(error)).strip()[:160]})") from None
        target.load_distributed(state, has_ema)

    def poll(self) -> None:
        """Finish the pending checkpoint if its write is done: a cheap look, no collective (call it every step)."""
        if self.pending is not None and self.pending.write.done():  # a synchronous write is finished at once
            self.finish()

    def wait(self) -> None:
        """Wait for the pending checkpoint's write, if any, and finish it."""
        if self.pending is not None:
            self.finish()

    def close(self) -> None:
        """Wait for the pending checkpoint, finish it, and free the host copy the stager keeps."""
        try:
            self.wait()
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None

    def finish(self) -> None:
        """Wait for this rank's write; rank 0 then moves the complete folder into place, `last.json`, and prunes."""
        pending, self.pending = self.pending, None
        try:
            if pending.write is not None:
                pending.write.result()
            if self.context.is_main:
                shards = pending.staging / SHARDED_DIR
                for path in [*shards.iterdir(), shards, pending.staging]:  # DCP's index and folder, too
                    fsync_path(path)
                final = move_into_place(self.run, pending.staging, pending.step)
        except (dcp.CheckpointException, OSError, RuntimeError) as error:
            raise self.failure(pending.step, pending.staging, error) from None
        if self.context.is_main:
            prune(self.run, final, self.keep)

    def failure(self, step: int, staging: Path, error: BaseException) -> UserError:
        """The one-line error of a failed checkpoint; rank 0 removes its staging folder."""
        return failed_checkpoint(self.run, step, staging if self.context.is_main else None, root_error(error))
