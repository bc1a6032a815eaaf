"""Reading what a checkpoint holds: the config and weights of a run folder (its last checkpoint), a checkpoint folder
(one-file or sharded), an exported folder, a .safetensors file, an official .pt/.pth or a `shipped:` name, and which
kind of weights (EMA or raw) each holds. A sharded checkpoint reads into the same full tensors as a one-file one, in
one process. The layout these read is `scalegen.runs.folder`'s.
"""
from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path

import torch

from scalegen.errors import UserError
from scalegen.files import first_line, read_json, read_weights_file, safe_torch_load
from scalegen.runs.folder import (
    CONFIG_FILE, EMA_FILE, EMA_STATE, EXPORTED_WEIGHTS_KEY, LAST_POINTER, MODEL_FILE, MODEL_STATE, SHARDED_DIR,
    SINGLE_PROCESS_WARNING, STATE_FILE, folder_config, holds_ema, is_complete, is_sharded, last_checkpoint,
    weights_file,
)
from scalegen.runs.names import WEIGHT_CHOICES, WeightChoice, checkpoint_path


def weights_folder(path: Path) -> Path:
    """The folder holding the weights of a run folder (its last checkpoint), a checkpoint folder or an export."""
    folder = last_checkpoint(path) or path
    if not is_complete(folder):
        raise UserError(f"{path} holds no checkpoint yet ({MODEL_FILE}, {SHARDED_DIR}/ or {LAST_POINTER} missing)")
    return folder


def stored_config(path: str | Path) -> dict:
    """The JSON config of a run folder (its last checkpoint's), a checkpoint folder or an exported folder."""
    return folder_config(weights_folder(checkpoint_path(path)))


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
    prefix = f"{EMA_STATE if prefer_ema and holds_ema(entries) else MODEL_STATE}."
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
    if choice is None:  # the EMA's where there are some: load_weights chose
        return stored, weights
    held = held_weights(path, choice, stored)
    if held is not None and held != choice:
        if choice == "ema":
            raise UserError(f"{path} holds no EMA weights (a run trained without EMA, or an export of the raw "
                            "weights); drop --weights ema (weights= in Python)")
        raise UserError(f"{path} is an export of the EMA weights alone; export the raw ones from its run with "
                        "`scalegen export --weights raw`, or drop --weights raw (weights= in Python)")
    return stored, weights
