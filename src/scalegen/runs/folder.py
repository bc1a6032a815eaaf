"""The run-folder layout, defined once, and one checkpoint format for every model: safetensors weights + JSON config,
written so that no crash, full disk or second trainer can lose a complete checkpoint.

A run folder (`scalegen train … --out RUN`) looks like:
    RUN/last.json                      {"step": 300, "path": "checkpoints/step-0000300"}
    RUN/checkpoints/step-0000300/      model.safetensors  [ema.safetensors]  config.json  training_state.pt
                                       (an FSDP run's: sharded/ instead of the weights: DCP's .metadata and each
                                       rank's __RANK_0.distcp with its shards of the model, EMA and optimizer)
    RUN/log.csv                        one row of figures per logged step (RUN/tensorboard/ with --logger tensorboard)
    RUN/eval.csv                       FID (and accuracy) of generated samples, a row per `--eval-every` evaluation
    RUN/progress.log                   the progress, a line per logged step, when training runs without a terminal
    RUN/samples/step-0000300.png       sample grids
    RUN/tokenizer.safetensors          the frozen tokenizer a VAR (or a tokenizer-latent DiT) run keeps a copy of
    RUN/latents/, RUN/tokens/          the optional latent / token caches (scalegen.data.store: shards and a
                                       manifest; RUN/latents.safetensors, RUN/tokens.safetensors in the earlier format)
    RUN/.lock                          the record of the process training in RUN (scalegen.runs.lock)
A checkpoint is written complete and fsync'ed in a staging folder, renamed into place under a name no live folder
has (a re-saved step gets `step-0000300.1`), and only then does `last.json` move; older folders are removed last.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from scalegen.distributed import launched_as_main
from scalegen.errors import UserError
from scalegen.files import (
    contiguous_copy, follow_umask, fsync_path, is_disk_full, make_temporary_folder, read_json, safe_torch_load,
    save_weights_atomic, write_failure, write_json_atomic,
)
from scalegen.runs.lock import LOCK_FILE, run_lock

LAST_POINTER = "last.json"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
SHARDED_DIR = "sharded"  # an FSDP checkpoint's torch.distributed.checkpoint folder
SHARDED_INDEX = ".metadata"  # the index DCP writes last, once every rank's shards are written
# A run's state to save by part (`Parallelism.state_to_save`): a DCP folder's top-level keys (its weights' key
# prefixes); the optimizer's is also its key in a one-file checkpoint's training_state.pt.
MODEL_STATE, EMA_STATE, OPTIMIZER_STATE = "model", "ema", "optimizer"
SINGLE_PROCESS_WARNING = ".*in a single process"  # what DCP warns when it reads without a process group, as meant
TOKENIZER_FILE = "tokenizer.safetensors"
LOG_FILE = "log.csv"
EVALUATION_LOG_FILE = "eval.csv"  # `--eval-every`: FID (and accuracy) of the samples, a row per evaluation
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"
LATENT_CACHE_DIR, TOKEN_CACHE_DIR = "latents", "tokens"
EARLIER_CACHE_SUFFIX = ".safetensors"  # the one-file caches of earlier versions: RUN/latents.safetensors
PROGRESS_FILE = "progress.log"  # a line per logged step when training runs without a terminal
OPTIONS_FILE = "options.yaml"  # the options of the last `scalegen train` command run in RUN (its --config file)
STAGING_PREFIX = ".staging-"
STEP_PREFIX = "step-"
STEP_DIGITS = 7
EXPORTED_WEIGHTS_KEY = "weights"  # an export's config: which kind of weights it holds
UNWRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder named step-0000300 or step-0000300.1; None for any other name."""
    digits = folder.name.removeprefix(STEP_PREFIX).split(".")[0]
    return int(digits) if folder.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def is_sharded(folder: Path) -> bool:
    """Whether a checkpoint folder holds an FSDP run's sharded weights (a complete DCP folder)."""
    return (folder / SHARDED_DIR / SHARDED_INDEX).exists()


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint or exported folder holds weights: one-file (model.safetensors) or sharded."""
    return (folder / MODEL_FILE).exists() or is_sharded(folder)


def folder_config(folder: Path) -> dict:
    """The JSON config of a folder holding weights (a checkpoint or exported folder)."""
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise UserError(f"{folder} has weights but no {CONFIG_FILE}; it is not a scalegen run or export")
    return read_json(config_path)


def weights_file(folder: Path, prefer_ema: bool = True) -> Path:
    """A one-file checkpoint's weights: its EMA's when it has them and they are preferred, else the model's."""
    return folder / EMA_FILE if prefer_ema and (folder / EMA_FILE).exists() else folder / MODEL_FILE


def holds_ema(keys: Iterable[str]) -> bool:
    """Whether a sharded checkpoint's keys (its DCP index's) hold EMA weights beside the model's."""
    return any(key.startswith(f"{EMA_STATE}.") for key in keys)


class RunFolder:
    """The paths of one training run (see the module docstring); nothing is created until something is written."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.last_pointer = self.root / LAST_POINTER
        self.checkpoints = self.root / CHECKPOINT_DIR
        self.log = self.root / LOG_FILE
        self.evaluation_log = self.root / EVALUATION_LOG_FILE
        self.tensorboard = self.root / TENSORBOARD_DIR
        self.tokenizer_copy = self.root / TOKENIZER_FILE
        self.latent_cache = self.root / LATENT_CACHE_DIR
        self.token_cache = self.root / TOKEN_CACHE_DIR
        self.earlier_latent_cache = self.root / (LATENT_CACHE_DIR + EARLIER_CACHE_SUFFIX)
        self.earlier_token_cache = self.root / (TOKEN_CACHE_DIR + EARLIER_CACHE_SUFFIX)
        self.lock_file = self.root / LOCK_FILE
        self.progress = self.root / PROGRESS_FILE

    def checkpoint(self, step: int) -> Path:
        """The canonical folder of the checkpoint at `step`."""
        return self.checkpoints / f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"

    def sample_grid(self, step: int) -> Path:
        """The sample grid drawn at `step`."""
        return self.root / SAMPLES_DIR / f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}.png"

    def step_folders(self) -> list[Path]:
        """Every checkpoint folder, newest step first (a re-saved step's newest copy first)."""
        folders = [path for path in self.checkpoints.glob(f"{STEP_PREFIX}*") if checkpoint_step(path) is not None]
        return sorted(folders, key=lambda path: (checkpoint_step(path), path.name.count("."), path.name), reverse=True)

    def pointed_checkpoint(self) -> Path | None:
        """The folder `last.json` names (checked to lie inside RUN/checkpoints), or None without a `last.json`."""
        if not self.last_pointer.exists():
            return None
        pointer = read_json(self.last_pointer)
        folder = self.root / str(pointer.get("path", ""))
        if not isinstance(pointer.get("path"), str) or folder.resolve().parent != self.checkpoints.resolve():
            raise UserError(f"{self.last_pointer} does not point into {self.checkpoints}; delete {self.last_pointer} "
                            "and re-run to resume from the newest complete checkpoint")
        return folder

    def last_checkpoint(self) -> Path | None:
        """The checkpoint folder `last.json` points at, or None for a run without checkpoints."""
        folder = self.pointed_checkpoint()
        if folder is not None and not is_complete(folder):
            raise UserError(f"{self.last_pointer} points at {folder}, which is incomplete; re-run the training command "
                            "to resume from the newest complete checkpoint")
        return folder

    def resume_candidates(self) -> list[tuple[Path | None, str | None]]:
        """Checkpoint folders to try on resume, in order: the one `last.json` names, then the others, newest first.

        Returns:
            (folder, None) pairs, and (None, why) first when `last.json` itself is unusable.
        """
        try:
            pointed = self.pointed_checkpoint()
        except UserError as error:
            return [(None, str(error))] + [(folder, None) for folder in self.step_folders()]
        others = [(folder, None) for folder in self.step_folders() if folder != pointed]
        return ([(pointed, None)] if pointed is not None else []) + others

    def clean_leftovers(self) -> list[Path]:
        """Remove what crashed writes left behind (staging folders, temporary files); returns what was removed."""
        leftovers = list(self.checkpoints.glob(f"{STAGING_PREFIX}*")) + list(self.root.glob(f".{LAST_POINTER}.*"))
        leftovers += [path for path in self.root.glob(".*.safetensors.*") if path.is_file()]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return leftovers


@contextmanager
def guarded_run(run_dir: str | Path) -> Iterator[RunFolder]:
    """Work in a run folder: hold its lock (rank 0 of a launch) and turn a full disk or an unwritable folder into a
    one-line error that says which checkpoint is intact."""
    run = RunFolder(run_dir)
    with run_lock(run.root) if launched_as_main() else nullcontext():
        try:
            yield run
        except (OSError, SafetensorError, RuntimeError) as error:
            if not (is_disk_full(error) or getattr(error, "errno", None) in UNWRITABLE_ERRNOS):
                raise
            live = run.pointed_checkpoint() if run.last_pointer.exists() else None
            kept = f"the last checkpoint {live.name} is intact" if live else "no checkpoint was written yet"
            raise UserError(f"{write_failure(error)} while writing in {run.root}; {kept}; free space (or fix the "
                            "permissions) and re-run to resume") from None


def write_checkpoint_files(folder: Path, config: dict, model_state: dict[str, torch.Tensor],
                           ema_state: dict[str, torch.Tensor] | None, training_state: dict,
                           extra_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The files of one checkpoint, each fsync'ed, into an existing (staging) folder (`extra_weights`: more weight
    files by name, e.g. the tokenizer an end-to-end run tunes)."""
    save_file(contiguous_copy(model_state), folder / MODEL_FILE)
    if ema_state is not None:
        save_file(contiguous_copy(ema_state), folder / EMA_FILE)
    for name, weights in (extra_weights or {}).items():
        save_file(contiguous_copy(weights), folder / name)
    write_state_files(folder, config, training_state)


def write_state_files(folder: Path, config: dict, training_state: dict) -> None:
    """config.json and training_state.pt into an existing (staging) folder, then each of its files fsync'ed (a
    sharded checkpoint's rank 0 writes these, the ranks their shards into SHARDED_DIR beside them)."""
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    torch.save(training_state, folder / STATE_FILE)
    for path in folder.iterdir():
        if path.is_file():
            follow_umask(path)
            fsync_path(path)
    fsync_path(folder)


def staging_folder(run: RunFolder) -> Path:
    """A new empty staging folder in RUN/checkpoints, which it creates when missing."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    return make_temporary_folder(run.checkpoints, STAGING_PREFIX)


def move_into_place(run: RunFolder, staging: Path, step: int) -> Path:
    """Rename a complete, fsync'ed staging folder to the free name of `step`, then point `last.json` at it."""
    final = free_name(run, step)
    os.replace(staging, final)
    fsync_path(run.checkpoints)
    write_json_atomic(run.last_pointer, {"step": step, "path": str(final.relative_to(run.root))})
    return final


def failed_checkpoint(run: RunFolder, step: int, staging: Path | None, error: BaseException) -> UserError:
    """Remove a failed checkpoint's staging folder; returns the one-line error that names the intact checkpoint."""
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    previous = run.pointed_checkpoint() if run.last_pointer.exists() else None
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    return UserError(f"{write_failure(error)} while writing checkpoint step {step} in {run.root}; {kept}; "
                     "free space (or fix the folder's permissions) and re-run to resume")


def free_name(run: RunFolder, step: int) -> Path:
    """The canonical folder of `step`, or the first free `.N` variant when a folder of that step already exists."""
    canonical = run.checkpoint(step)
    candidate, generation = canonical, 0
    while candidate.exists():
        generation += 1
        candidate = canonical.with_name(f"{canonical.name}.{generation}")
    return candidate


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    config: dict,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    training_state: dict,
    keep: int = 2,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write one complete checkpoint folder, then point `last.json` at it; keep the newest `keep` steps.

    Args:
        run_dir: the run folder.
        step: the optimizer step the weights belong to.
        config: the JSON config that rebuilds the model.
        model_state, ema_state: the weights; ema_state None writes no ema.safetensors (a run without EMA).
        training_state: optimizer, RNG and step state (tensors and plain containers only).
        keep: how many steps' checkpoints to keep (the one `last.json` names is always kept).
        extra_weights: more weight files of this step by file name (the tokenizer of an end-to-end run).
    Returns:
        The checkpoint folder.
    Raises:
        UserError: the disk is full or the folder unwritable; the partial files are removed, the previous
            checkpoint is untouched.
    """
    run = RunFolder(run_dir)
    staging = None
    try:
        staging = staging_folder(run)
        write_checkpoint_files(staging, config, model_state, ema_state, training_state, extra_weights)
        final = move_into_place(run, staging, step)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise failed_checkpoint(run, step, staging, error) from None
    prune(run, final, keep)
    return final


def prune(run: RunFolder, live: Path, keep: int) -> None:
    """Keep the live folder and the newest copy of the `keep - 1` steps before it; remove the rest (older copies of
    a re-saved step, folders of later steps a resume fell back from)."""
    live_step = checkpoint_step(live)
    kept_steps = {live_step}
    for folder in run.step_folders():  # newest first
        step = checkpoint_step(folder)
        if folder == live:
            continue
        if step < live_step and step not in kept_steps and len(kept_steps) < keep:
            kept_steps.add(step)
            continue
        shutil.rmtree(folder, ignore_errors=True)


def keep_tokenizer_copy(tokenizer_state: dict[str, torch.Tensor], run_dir: str | Path) -> None:
    """Copy a frozen tokenizer's weights into RUN/tokenizer.safetensors once, so the run is rebuilt from itself."""
    run = RunFolder(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    if not run.tokenizer_copy.exists():
        save_weights_atomic(tokenizer_state, run.tokenizer_copy)


def find_tokenizer_copy(checkpoint: str | Path) -> Path | None:
    """The tokenizer.safetensors kept with a run: in the run's last checkpoint (an end-to-end run tunes its tokenizer
    and keeps it with each step), in `checkpoint` itself (a checkpoint, run or exported folder) or up to three folders
    above it (a checkpoint folder sits at RUN/checkpoints/step-N); None when there is none."""
    checkpoint = Path(checkpoint)
    last = last_checkpoint(checkpoint) if checkpoint.is_dir() else None
    folders = ([last] if last else []) + ([checkpoint] if checkpoint.is_dir() else []) + list(checkpoint.parents)[:3]
    return next((folder / TOKENIZER_FILE for folder in folders if (folder / TOKENIZER_FILE).exists()), None)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder a run's `last.json` points at, or None for a run without checkpoints."""
    return RunFolder(run_dir).last_checkpoint()


def load_training_state(folder: Path) -> dict:
    """The optimizer / step / sampler / RNG state saved beside a checkpoint."""
    return safe_torch_load(folder / STATE_FILE)
