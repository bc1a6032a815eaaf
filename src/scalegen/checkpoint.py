"""The run-folder layout, defined once, and one checkpoint format for every model: safetensors weights + JSON config,
written atomically.

A run folder (`scalegen train … --out RUN`) looks like:
    RUN/last.json                      {"step": 300, "path": "checkpoints/step-0000300"}
    RUN/checkpoints/step-0000300/      model.safetensors  [ema.safetensors]  config.json  training_state.pt
    RUN/log.csv                        one row of figures per logged step (RUN/tensorboard/ with --logger tensorboard)
    RUN/samples/step-0000300.png       sample grids
    RUN/tokenizer.safetensors          the frozen tokenizer a VAR (or a tokenizer-latent DiT) run keeps a copy of
    RUN/latents.safetensors, RUN/tokens.safetensors   the optional latent / token caches
`last.json` is replaced only after a checkpoint folder is complete, so a crash never leaves a half-written "last".
An exported folder (`scalegen export`) holds model.safetensors, config.json and the tokenizer copy side by side.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scalegen.errors import UserError

LAST_POINTER = "last.json"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
TOKENIZER_FILE = "tokenizer.safetensors"
LOG_FILE = "log.csv"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"
LATENT_CACHE_FILE = "latents.safetensors"
TOKEN_CACHE_FILE = "tokens.safetensors"
STAGING_PREFIX = ".staging-"
ASSETS = Path(__file__).parent / "assets"  # weights shipped inside the package


class RunFolder:
    """The paths of one training run (see the module docstring); nothing is created until something is written."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.last_pointer = self.root / LAST_POINTER
        self.checkpoints = self.root / CHECKPOINT_DIR
        self.log = self.root / LOG_FILE
        self.tensorboard = self.root / TENSORBOARD_DIR
        self.tokenizer_copy = self.root / TOKENIZER_FILE
        self.latent_cache = self.root / LATENT_CACHE_FILE
        self.token_cache = self.root / TOKEN_CACHE_FILE

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint at `step`."""
        return self.checkpoints / f"step-{step:07d}"

    def sample_grid(self, step: int) -> Path:
        """The sample grid drawn at `step`."""
        return self.root / SAMPLES_DIR / f"step-{step:07d}.png"

    def last_checkpoint(self) -> Path | None:
        """The checkpoint folder `last.json` points at, or None for a run without checkpoints."""
        if not self.last_pointer.exists():
            return None
        pointer = read_json(self.last_pointer)
        if not isinstance(pointer.get("path"), str):
            raise UserError(f"{self.last_pointer} has no checkpoint path; delete it to start afresh")
        folder = self.root / pointer["path"]
        if not (folder / MODEL_FILE).exists():
            raise UserError(f"{self.last_pointer} points at {folder}, which is incomplete; "
                            f"delete {self.last_pointer} to start afresh")
        return folder


def json_config(config) -> dict:
    """`asdict(config)` as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(asdict(config)))


def read_json(path: Path) -> dict:
    """A JSON object from a file; a one-line error when it is not valid JSON or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path} ({error}); restore it from a copy or train the run again") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} holds a JSON {type(payload).__name__}, not an object; restore it from a copy")
    return payload


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a one-line error when it is truncated or no safetensors file at all."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {path} ({first_line}): it is truncated or not a safetensors file; "
                        "export or train it again") from None


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(temporary, path)


def contiguous_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    config: dict,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    training_state: dict,
    keep: int = 2,
) -> Path:
    """Write one complete checkpoint folder, then point `last.json` at it; keep the newest `keep` folders.

    Args:
        run_dir: the run folder.
        step: the optimizer step the weights belong to.
        config: the JSON config that rebuilds the model.
        model_state, ema_state: the weights; ema_state None writes no ema.safetensors (a run without EMA).
        training_state: optimizer, RNG and step state (tensors and plain containers only).
        keep: how many checkpoint folders to keep.
    Returns:
        The checkpoint folder.
    """
    run = RunFolder(run_dir)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoint(step)
    staging = Path(tempfile.mkdtemp(dir=run.checkpoints, prefix=STAGING_PREFIX))
    save_file(contiguous_copy(model_state), staging / MODEL_FILE)
    if ema_state is not None:
        save_file(contiguous_copy(ema_state), staging / EMA_FILE)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    torch.save(training_state, staging / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    write_json_atomic(run.last_pointer, {"step": step, "path": str(final.relative_to(run.root))})
    for old in sorted(run.checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights_atomic(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written under a temporary name, then renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(contiguous_copy(state_dict), temporary)
    temporary.replace(path)


def keep_tokenizer_copy(tokenizer_state: dict[str, torch.Tensor], run_dir: str | Path) -> None:
    """Copy a frozen tokenizer's weights into RUN/tokenizer.safetensors once, so the run is rebuilt from itself."""
    run = RunFolder(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    if not run.tokenizer_copy.exists():
        save_weights_atomic(tokenizer_state, run.tokenizer_copy)


def find_tokenizer_copy(checkpoint: str | Path) -> Path | None:
    """The tokenizer.safetensors kept with a run: in `checkpoint` itself (a run or exported folder) or up to three
    folders above it (a checkpoint folder sits at RUN/checkpoints/step-N); None when there is none."""
    checkpoint = Path(checkpoint)
    folders = ([checkpoint] if checkpoint.is_dir() else []) + list(checkpoint.parents)[:3]
    return next((folder / TOKENIZER_FILE for folder in folders if (folder / TOKENIZER_FILE).exists()), None)


def halved(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict in fp16; integer ones unchanged."""
    return {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def export_weights(run: str | Path, destination: str | Path, half: bool = True, prefer_ema: bool = True) -> Path:
    """Copy a run's final weights into a self-contained folder that every loader accepts as `--ckpt`.

    Args:
        run: a run or checkpoint folder (its EMA weights are taken when it has them).
        destination: the folder to write: model.safetensors, config.json, and the run's tokenizer.safetensors when
            it has one.
        half: store floating-point weights, the tokenizer's too, as fp16 (the loaders cast them back to the
            model's precision).
        prefer_ema: take the EMA weights when the run has them; False takes the raw (last optimizer step) weights.
    Returns:
        The destination folder.
    """
    stored, weights = load_weights(run, prefer_ema)
    if stored is None:
        raise UserError(f"{run} is not a scalegen run or checkpoint folder; export needs its config.json")
    if half:
        weights = halved(weights)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    save_weights_atomic(weights, destination / MODEL_FILE)
    tokenizer = find_tokenizer_copy(run)
    if tokenizer is not None:
        tokenizer_weights = read_weights_file(tokenizer)
        save_weights_atomic(halved(tokenizer_weights) if half else tokenizer_weights, destination / TOKENIZER_FILE)
        # the training machine's tokenizer path means nothing elsewhere: the copy beside the model is the source
        stored = {**stored, "tokenizer": {**stored.get("tokenizer", {}), "source": None}}
    write_json_atomic(destination / CONFIG_FILE, stored)
    return destination


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder a run's `last.json` points at, or None for a run without checkpoints."""
    return RunFolder(run_dir).last_checkpoint()


class StoredArguments:
    """What an `argparse.Namespace` in an official checkpoint unpickles into: a plain attribute bag (DiT's train.py
    stores its arguments as one), so loading them runs no code of argparse's or anyone's."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


# The pickled name of argparse.Namespace, resolved to StoredArguments by the weights-only unpickler.
STORED_ARGUMENTS_NAME = "argparse.Namespace"


def safe_torch_load(path: str | Path):
    """torch.load restricted to tensors and plain containers; anything needing arbitrary unpickling is refused."""
    try:
        with torch.serialization.safe_globals([(StoredArguments, STORED_ARGUMENTS_NAME)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"refusing to load {path}: it needs arbitrary unpickling, which could run code ({first_line[:120]}); "
            "convert it to a plain state dict or safetensors"
        ) from None


def load_training_state(folder: Path) -> dict:
    """The optimizer / step / sampler / RNG state saved beside a checkpoint."""
    return safe_torch_load(folder / STATE_FILE)


def weights_folder(path: Path) -> Path:
    """The folder holding the weights of a run folder (its last checkpoint), a checkpoint folder or an export."""
    folder = last_checkpoint(path) or path
    if not (folder / MODEL_FILE).exists():
        raise UserError(f"{path} holds no checkpoint yet ({MODEL_FILE} or {LAST_POINTER} missing)")
    return folder


def stored_config(path: str | Path) -> dict:
    """The JSON config of a run folder (its last checkpoint's), a checkpoint folder or an exported folder."""
    folder = weights_folder(Path(path))
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise UserError(f"{folder} has weights but no {CONFIG_FILE}; it is not a scalegen run or export")
    return read_json(config_path)


def load_weights(path: str | Path, prefer_ema: bool = True) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """Resolve a run folder, a checkpoint folder, a .safetensors file or an official .pt/.pth into weights.

    Returns:
        (config, state_dict): config is the stored JSON config (None for an official checkpoint, whose config
        the caller infers from the weights); the EMA weights are preferred when present.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a run folder, a checkpoint folder or a .pt file")
    if path.is_dir():
        folder = weights_folder(path)
        weights = folder / EMA_FILE if prefer_ema and (folder / EMA_FILE).exists() else folder / MODEL_FILE
        return stored_config(folder), read_weights_file(weights)
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
