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
    RUN/latents/, RUN/tokens/          the optional latent / token caches (scalegen.cache_store: shards and a
                                       manifest; RUN/latents.safetensors, RUN/tokens.safetensors in the earlier format)
    RUN/.lock                          the record of the process training in RUN (scalegen.run_lock)
A checkpoint is written complete and fsync'ed in a staging folder, renamed into place under a name no live folder
has (a re-saved step gets `step-0000300.1`), and only then does `last.json` move; older folders are removed last.
An exported folder (`scalegen export`) holds model.safetensors, config.json and the tokenizer copy side by side;
`load_weights` and `export_weights` read a sharded checkpoint into the same full tensors in one process.
"""
from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from scalegen.distributed import launched_as_main
from scalegen.checkpoint_names import WEIGHT_CHOICES, WeightChoice, checkpoint_path
from scalegen.errors import UserError
from scalegen.files import (
    contiguous_copy, first_line, follow_umask, fsync_path, is_disk_full, make_temporary_folder, read_json,
    read_weights_file, safe_torch_load, save_weights_atomic, write_failure, write_json_atomic,
)
from scalegen.run_lock import LOCK_FILE, run_lock

LAST_POINTER = "last.json"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
SHARDED_DIR = "sharded"  # an FSDP checkpoint's torch.distributed.checkpoint folder
SHARDED_INDEX = ".metadata"  # the index DCP writes last, once every rank's shards are written
SHARDED_MODEL, SHARDED_EMA = "model", "ema"  # the top-level keys (key prefixes) of the weights in a DCP folder
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


def halved(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict in fp16; integer ones unchanged."""
    return {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def portable_config(stored: dict, tokenizer_copied: bool) -> dict:
    """A run's config without the training machine's paths, as an export writes it: the training data, the REPA
    (or VA-VAE alignment) encoder's file and the fine-tuning origin keep their names only (provenance; no loader reads their paths), and
    with `tokenizer_copied` the tokenizer's source is dropped (the copy beside the model is the source). An SD-VAE's
    path stays: the loaders read it (`--vae` overrides it)."""
    portable = dict(stored)
    for key in ("data", "repa_encoder", "align_encoder"):
        if portable.get(key):
            portable[key] = Path(portable[key]).name
    if isinstance(portable.get("init_from"), dict) and portable["init_from"].get("path"):
        portable["init_from"] = {**portable["init_from"], "path": Path(portable["init_from"]["path"]).name}
    if tokenizer_copied:
        portable["tokenizer"] = {**portable.get("tokenizer", {}), "source": None}
    return portable


def export_weights(run: str | Path, destination: str | Path, half: bool = True, prefer_ema: bool = True) -> Path:
    """Copy a run's final weights into a self-contained folder that every loader accepts as `--ckpt`.

    Args:
        run: a run or checkpoint folder (its EMA weights are taken when it has them).
        destination: the folder to write: model.safetensors, config.json (the run's, which keeps its recommended
            sampling settings, and says which weights the export holds), and the run's tokenizer.safetensors when it
            has one.
        half: store floating-point weights, the tokenizer's too, as fp16 (the loaders cast them back to the
            model's precision).
        prefer_ema: take the EMA weights when the run has them; False takes the raw (last optimizer step) weights.
    Returns:
        The destination folder.
    """
    run = checkpoint_path(run)
    stored, weights = load_weights(run, prefer_ema)
    if stored is None:
        raise UserError(f"{run} is not a scalegen run or checkpoint folder; export needs its config.json")
    held = held_weights(run, "ema" if prefer_ema else "raw", stored)
    tokenizer = find_tokenizer_copy(run)
    tokenizer_weights = read_weights_file(tokenizer) if tokenizer is not None else None
    destination = Path(destination)
    try:
        destination.mkdir(parents=True, exist_ok=True)
        save_weights_atomic(halved(weights) if half else weights, destination / MODEL_FILE)
        if tokenizer_weights is not None:
            save_weights_atomic(halved(tokenizer_weights) if half else tokenizer_weights, destination / TOKENIZER_FILE)
        config = {**portable_config(stored, tokenizer_weights is not None), EXPORTED_WEIGHTS_KEY: held}
        write_json_atomic(destination / CONFIG_FILE, config)
    except (OSError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{write_failure(error)} while exporting to {destination}; choose another --out") from None
    return destination


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder a run's `last.json` points at, or None for a run without checkpoints."""
    return RunFolder(run_dir).last_checkpoint()


def load_training_state(folder: Path) -> dict:
    """The optimizer / step / sampler / RNG state saved beside a checkpoint."""
    return safe_torch_load(folder / STATE_FILE)


def weights_folder(path: Path) -> Path:
    """The folder holding the weights of a run folder (its last checkpoint), a checkpoint folder or an export."""
    folder = last_checkpoint(path) or path
    if not is_complete(folder):
        raise UserError(f"{path} holds no checkpoint yet ({MODEL_FILE}, {SHARDED_DIR}/ or {LAST_POINTER} missing)")
    return folder


def stored_config(path: str | Path) -> dict:
    """The JSON config of a run folder (its last checkpoint's), a checkpoint folder or an exported folder."""
    folder = weights_folder(checkpoint_path(path))
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise UserError(f"{folder} has weights but no {CONFIG_FILE}; it is not a scalegen run or export")
    return read_json(config_path)


def weights_file(folder: Path, prefer_ema: bool = True) -> Path:
    """A one-file checkpoint's weights: its EMA's when it has them and they are preferred, else the model's."""
    return folder / EMA_FILE if prefer_ema and (folder / EMA_FILE).exists() else folder / MODEL_FILE


def holds_ema(keys: Iterable[str]) -> bool:
    """Whether a sharded checkpoint's keys (its DCP index's) hold EMA weights beside the model's."""
    return any(key.startswith(f"{SHARDED_EMA}.") for key in keys)


def read_checkpoint_weights(folder: Path, with_ema: bool) -> tuple[dict | None, dict | None]:
    """A one-file checkpoint's (weights, EMA weights) to resume from: the EMA's are the weights themselves for a run
    checkpointed without EMA, None when `with_ema` is false; (None, None) for a sharded checkpoint, whose weights
    the trainer reads straight into its (sharded) modules."""
    if is_sharded(folder):
        return None, None
    return read_weights_file(folder / MODEL_FILE), read_weights_file(weights_file(folder)) if with_ema else None


def sharded_entries(folder: Path) -> dict:
    """The entries (key -> metadata) of a sharded checkpoint folder's DCP index."""
    import torch.distributed.checkpoint as dcp  # imported here, as in `read_sharded_weights`

    try:
        return dcp.FileSystemReader(folder / SHARDED_DIR).read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot read the shard index of {folder} ({first_line(error)}); resume or export an "
                        "earlier checkpoint") from None


def read_sharded_weights(folder: Path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The full model (or EMA) tensors of a sharded checkpoint folder, read in this process alone.

    Args:
        folder: a checkpoint folder holding SHARDED_DIR (written by any number of ranks).
        prefer_ema: take the EMA weights when the checkpoint has them.
    Returns:
        A plain state dict (the model's own key names), as a one-file checkpoint's model.safetensors holds.
    """
    # Imported here: torch.distributed.checkpoint takes 0.7 s to import, and only sharded checkpoints need it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder / SHARDED_DIR)
    entries = sharded_entries(folder)
    prefix = f"{SHARDED_EMA if prefer_ema and holds_ema(entries) else SHARDED_MODEL}."
    # Full tensors allocated from the index; DCP fills them from whichever ranks' files hold their pieces.
    weights = {key.removeprefix(prefix): torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in entries.items()
               if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    single_process = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}  # torch ≥ 2.7
    try:
        with warnings.catch_warnings():  # a single process is the intent, and torch says it assumes so
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
            dcp.load({prefix.rstrip("."): weights}, storage_reader=reader, **single_process)
    except (dcp.api.CheckpointException, OSError, RuntimeError) as error:
        raise UserError(f"cannot read the shards of {folder} ({first_line(error)}); resume or export an earlier "
                        "checkpoint") from None
    return weights


def load_weights(path: str | Path, prefer_ema: bool = True) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """Resolve a run folder, a checkpoint folder, a .safetensors file, an official .pt/.pth or a `shipped:` name into
    weights.

    Returns:
        (config, state_dict): config is the stored JSON config (None for an official checkpoint, whose config
        the caller infers from the weights); the EMA weights are preferred when present.
    """
    path = checkpoint_path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a run folder, a checkpoint folder or a .pt file")
    if path.is_dir():
        folder = weights_folder(path)
        if is_sharded(folder):
            return stored_config(folder), read_sharded_weights(folder, prefer_ema)
        return stored_config(folder), read_weights_file(weights_file(folder, prefer_ema))
    if path.suffix == ".safetensors":
        config_path = path.parent / CONFIG_FILE
        config = read_json(config_path) if config_path.exists() else None
        return config, read_weights_file(path)
    loaded = safe_torch_load(path)
    if isinstance(loaded, dict) and prefer_ema and isinstance(loaded.get("ema"), dict):
        loaded = loaded["ema"]
    elif isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise UserError(f"{path} is not a state dict (nor a dict with 'ema' or 'model'); cannot load it")
    return None, loaded


def held_weights(path: str | Path, choice: WeightChoice, stored: dict | None) -> WeightChoice | None:
    """Which weights `load_weights(path, prefer_ema=choice == "ema")` reads: `choice` where a checkpoint holds both
    kinds, "raw" for a run checkpoint without EMA, what an export's config says it holds; None where nothing says
    (an official file, an export written before exports said it)."""
    path = Path(path)
    if not path.is_dir():
        return stored.get(EXPORTED_WEIGHTS_KEY) if stored else None
    folder = weights_folder(path)
    if is_sharded(folder):
        return choice if holds_ema(sharded_entries(folder)) else "raw"
    if (folder / EMA_FILE).exists():
        return choice
    if (folder / STATE_FILE).exists():  # a run's checkpoint, written without EMA
        return "raw"
    return (stored or {}).get(EXPORTED_WEIGHTS_KEY)


def load_chosen_weights(path: str | Path, choice: WeightChoice | None = None) -> tuple[dict | None, dict]:
    """`load_weights` with the weights a user chose: "ema", "raw", or None (the EMA's where there are some, else the
    raw ones); a one-line error when `path` holds only the other kind.

    Returns:
        (config, state_dict) as `load_weights`.
    """
    if choice is not None and choice not in WEIGHT_CHOICES:
        raise UserError(f"unknown weights {choice!r}: use one of {', '.join(WEIGHT_CHOICES)}")
    path = checkpoint_path(path)
    stored, weights = load_weights(path, prefer_ema=choice != "raw")
    held = held_weights(path, choice or "ema", stored)
    if choice is not None and held is not None and held != choice:
        if choice == "ema":
            raise UserError(f"{path} holds no EMA weights (a run trained without EMA, or an export of the raw "
                            "weights); drop --weights ema (weights= in Python)")
        raise UserError(f"{path} is an export of the EMA weights alone; export the raw ones from its run with "
                        "`scalegen export --weights raw`, or drop --weights raw (weights= in Python)")
    return stored, weights
