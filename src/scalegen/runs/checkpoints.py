"""The one checkpoint manager of a training run (torchtitan's `CheckpointManager` is its model) and the checkpoint
formats' interface: the manager writes each checkpoint in the format the run's parallelism names, resumes from the
newest checkpoint it can read, and reads each folder with the format that recognises it on disk, so neither the
trainer nor a parallelism ever asks which format a folder holds.

    manager = CheckpointManager(RunFolder("runs/dit"), keep=2, context=context, format_name="one-file")
    manager.save(step, config, state, training_state, task_weights)     # state: the parallelism's `state_to_save`
    folder, config, training_state = manager.resume(check, load)         # the newest readable one, or None
    manager.load(folder, training_state, target)                         # (what `load` does) target: the modules
    manager.poll(); manager.close()                                      # a background write finished

A format writes a run's state into a checkpoint folder (`write`, on every rank, possibly finishing in the background:
`poll`, `close`), recognises its own folders (`is_mine`) and reads one back into a run's modules (`read_into`),
whatever the parallelism that holds them. The built-in ones, one-file (one_file.py: safetensors + training state,
rank 0) and sharded (sharded.py: DCP, every rank, in the background), register themselves where they are defined
(the strategies of train/parallel.py import them); another is one class registered with `register_format`:

    @register_format
    class Mine(CheckpointFormat):
        name = "mine"
        ...
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from tqdm import tqdm

from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.registry import Registry
from scalegen.runs.folder import RunFolder, folder_config, load_training_state


class CheckpointTarget(Protocol):
    """A run's modules as its parallelism holds them: what a format reads a checkpoint into (train/parallel.py)."""

    has_ema: bool

    def load_full(self, weights: dict[str, torch.Tensor], ema_weights: dict[str, torch.Tensor] | None,
                  optimizer_state: dict) -> None:
        """Load full tensors present on every rank (the model's, the EMA's: None without EMA, the optimizer's by
        index), strictly."""

    def distributed_state(self, with_ema: bool) -> dict:
        """This rank's state as torch.distributed's state-dict API gives it (MODEL_STATE, OPTIMIZER_STATE, and
        EMA_STATE when `with_ema`): what DCP writes, and the tensors it reads into."""

    def load_distributed(self, state: dict, with_ema: bool) -> None:
        """Put a `distributed_state` DCP has read into the modules (without EMA in it, the EMA starts from the
        model's weights)."""


class CheckpointFormat(ABC):
    """One way of writing a checkpoint folder; every rank makes the same calls in the same order.

    Args:
        run: the run folder the checkpoints go into.
        keep: how many steps' checkpoints to keep.
        context: this process's rank, the world size and its device.
    """

    name: ClassVar[str]  # what a parallelism names as the format it writes (`Parallelism.checkpoint_format`)

    def __init__(self, run: RunFolder, keep: int, context: DistributedContext):
        self.run, self.keep, self.context = run, keep, context

    @classmethod
    @abstractmethod
    def is_mine(cls, folder: Path) -> bool:
        """Whether `folder` holds a complete checkpoint of this format."""

    @abstractmethod
    def write(self, step: int, config: dict, state: dict, training_state: dict,
              task_weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write checkpoint `step` (every rank calls this): in place once complete, `last.json` pointed at it, older
        ones pruned, as runs/folder.py lays out.

        Args:
            config: the JSON config that rebuilds the model.
            state: the parallelism's `state_to_save` (MODEL_STATE, OPTIMIZER_STATE, EMA_STATE without EMA absent).
            training_state: the scaler, step, RNG, train config and task state (all but the optimizer's).
            task_weights: the task's own weight files by name (the tokenizer of an end-to-end run).
        Raises:
            UserError: the checkpoint could not be written; the previous one is intact.
        """

    @classmethod
    @abstractmethod
    def read_into(cls, folder: Path, training_state: dict, target: CheckpointTarget) -> None:
        """Read the weights, EMA and optimizer state of checkpoint `folder` into `target` (every rank calls this).

        Args:
            training_state: the checkpoint's training state (a format may keep the optimizer's in it).
        Raises:
            UserError: the checkpoint cannot be read.
        """

    def poll(self) -> None:
        """Finish a checkpoint written in the background if its write is done (called every step: no collective)."""

    def close(self) -> None:
        """Finish a checkpoint being written and free what writing it holds (at the end of training)."""


CHECKPOINT_FORMATS: Registry[type[CheckpointFormat]] = Registry("checkpoint format")  # in registration order


def register_format(format_class: type[CheckpointFormat]) -> type[CheckpointFormat]:
    """Register a checkpoint format under its `name` (a class decorator); returns the class."""
    return CHECKPOINT_FORMATS.register(format_class.name, format_class)


def registered_format(name: str) -> type[CheckpointFormat]:
    """The format registered as `name`; a one-line error lists the registered ones."""
    return CHECKPOINT_FORMATS.chosen(name)


def format_of(folder: Path) -> type[CheckpointFormat]:
    """The registered format whose complete checkpoint `folder` holds; a one-line error when none does."""
    for format_class in CHECKPOINT_FORMATS.values():
        if format_class.is_mine(folder):
            return format_class
    raise UserError(f"{folder} holds no complete checkpoint of any format ({', '.join(CHECKPOINT_FORMATS)}); "
                    "resume from an earlier one")


class CheckpointManager:
    """Saves a run's checkpoints in one format and loads them from any registered format.

    Args:
        run: the run folder.
        keep: how many steps' checkpoints to keep.
        context: this process's rank, the world size and its device.
        format_name: the registered format checkpoints are written in (`Parallelism.checkpoint_format`).
    """

    def __init__(self, run: RunFolder, keep: int, context: DistributedContext, format_name: str):
        self.run, self.context = run, context
        self.format = registered_format(format_name)(run, keep, context)

    def save(self, step: int, config: dict, state: dict, training_state: dict,
             task_weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write checkpoint `step` (every rank calls this, with finite weights): see `CheckpointFormat.write`."""
        self.format.write(step, config, state, training_state, task_weights)

    def resume(self, check: Callable[[dict], None],
               load: Callable[[Path, dict], None]) -> tuple[Path, dict, dict] | None:
        """Resume from the newest checkpoint that can be read (the one `last.json` names unless it is broken): one
        that cannot be read is skipped, rank 0 saying why, for the one before.

        Args:
            check: called with a readable checkpoint's config before it is loaded; what it raises (a different
                model) stops the resume.
            load: puts checkpoint (folder, training state) into the run (its weights through `load`, then the
                rest); a `UserError` skips the checkpoint (every rank fails alike).
        Returns:
            (folder, config, training state) of the checkpoint resumed from; None for a run without checkpoints.
        Raises:
            UserError: the run holds checkpoints but none can be read.
        """
        candidates = self.run.resume_candidates()
        for folder, problem in candidates:
            try:
                if problem is not None:
                    raise UserError(problem)
                config, training_state = self.read(folder)
            except UserError as error:
                self.skipping(folder, error)
                continue
            check(config)
            try:
                load(folder, training_state)
            except UserError as error:
                self.skipping(folder, error)
                continue
            return folder, config, training_state
        if candidates:
            raise UserError(f"{self.run.root} holds checkpoints but none is complete; move the folder away to start "
                            "afresh")
        return None

    def skipping(self, folder: Path | None, error: UserError) -> None:
        """Say (rank 0) that a checkpoint is skipped on resume, and why."""
        if self.context.is_main:
            tqdm.write(f"skipping checkpoint {folder.name if folder else 'pointer'}: {error}")

    def read(self, folder: Path) -> tuple[dict, dict]:
        """The config and training state of checkpoint `folder`, of whichever format.

        Raises:
            UserError: no registered format holds a complete checkpoint there, or its files cannot be read.
        """
        format_of(folder)
        return folder_config(folder), load_training_state(folder)

    def load(self, folder: Path, training_state: dict, target: CheckpointTarget) -> None:
        """Read checkpoint `folder`'s weights, EMA and optimizer state into `target` with the format found there.

        Raises:
            UserError: the checkpoint cannot be read.
        """
        format_of(folder).read_into(folder, training_state, target)

    def poll(self) -> None:
        """Finish a checkpoint written in the background if its write is done (no collective)."""
        self.format.poll()

    def close(self) -> None:
        """Finish a checkpoint being written and free what writing it holds."""
        self.format.close()

