"""One checkpoint format for every model: safetensors weights + JSON config, written atomically.

A run folder looks like:
    RUN/last.json                      {"step": 300, "path": "checkpoints/step-0000300"}
    RUN/checkpoints/step-0000300/      model.safetensors  ema.safetensors  config.json  training_state.pt
`last.json` is replaced only after a checkpoint folder is complete, so a crash never leaves a half-written "last".
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scalegen.errors import UserError

LAST_POINTER = "last.json"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
TOKENIZER_FILE = "tokenizer.safetensors"  # the frozen tokenizer a VAR (or a tokenizer-latent DiT) run keeps a copy of


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

    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    checkpoints = run_dir / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(dir=checkpoints, prefix=".staging-"))
    save_file(contiguous_copy(model_state), staging / MODEL_FILE)
    if ema_state is not None:
        save_file(contiguous_copy(ema_state), staging / EMA_FILE)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    torch.save(training_state, staging / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    write_json_atomic(run_dir / LAST_POINTER, {"step": step, "path": str(final.relative_to(run_dir))})
    for old in sorted(checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights_atomic(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written under a temporary name, then renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(contiguous_copy(state_dict), temporary)
    temporary.replace(path)


def keep_tokenizer_copy(tokenizer_state: dict[str, torch.Tensor], run_dir: Path) -> None:
    """Copy a frozen tokenizer's weights into RUN/tokenizer.safetensors once, so the run is rebuilt from itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / TOKENIZER_FILE).exists():
        save_weights_atomic(tokenizer_state, run_dir / TOKENIZER_FILE)


def find_tokenizer_copy(checkpoint: str | Path) -> Path | None:
    """The tokenizer.safetensors kept with a run: in `checkpoint` itself (a folder) or up to three folders above it
    (a checkpoint folder sits at RUN/checkpoints/step-N); None when there is none."""
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
        tokenizer_weights = load_file(tokenizer)
        save_weights_atomic(halved(tokenizer_weights) if half else tokenizer_weights, destination / TOKENIZER_FILE)
        # the training machine's tokenizer path means nothing elsewhere: the copy beside the model is the source
        stored = {**stored, "tokenizer": {**stored.get("tokenizer", {}), "source": None}}
    write_json_atomic(destination / CONFIG_FILE, stored)
    return destination


def register(commands) -> None:
    """Add `scalegen export` to the command line."""
    parser = commands.add_parser("export", help="copy a run's final (EMA) weights into a small self-contained folder")
    parser.add_argument("--run", required=True, help="run or checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write (model.safetensors, config.json, tokenizer)")
    parser.add_argument("--fp32", dest="half", action="store_false", help="keep fp32 weights (default: fp16)")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    parser.set_defaults(handler=lambda args: print(
        f"exported {export_weights(args.run, args.out, args.half, prefer_ema=args.weights == 'ema')}"))


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder `last.json` points at, or None for a run without checkpoints."""
    pointer = Path(run_dir) / LAST_POINTER
    if not pointer.exists():
        return None
    folder = Path(run_dir) / json.loads(pointer.read_text())["path"]
    if not (folder / MODEL_FILE).exists():
        raise UserError(f"{pointer} points at {folder}, which is incomplete; delete {pointer} to start afresh")
    return folder


def safe_torch_load(path: str | Path):
    """torch.load restricted to tensors and plain containers; anything needing arbitrary unpickling is refused."""
    try:
        # argparse.Namespace is allowed: the official DiT train.py stores its args as one (a plain attribute bag).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"refusing to load {path}: it needs arbitrary unpickling, which could run code ({first_line[:120]}); "
            "convert it to a plain state dict or safetensors"
        ) from None


def load_training_state(folder: Path) -> dict:
    """The optimizer / step / sampler / RNG state saved beside a checkpoint."""
    return safe_torch_load(folder / STATE_FILE)


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
        folder = last_checkpoint(path) or path
        if not (folder / MODEL_FILE).exists():
            raise UserError(f"{path} holds no checkpoint yet ({MODEL_FILE} or {LAST_POINTER} missing)")
        weights = folder / EMA_FILE if prefer_ema and (folder / EMA_FILE).exists() else folder / MODEL_FILE
        return json.loads((folder / CONFIG_FILE).read_text()), load_file(weights)
    if path.suffix == ".safetensors":
        config_path = path.parent / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else None
        return config, load_file(path)
    loaded = safe_torch_load(path)
    if isinstance(loaded, dict) and prefer_ema and isinstance(loaded.get("ema"), dict):
        loaded = loaded["ema"]
    elif isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise UserError(f"{path} is not a state dict (nor a dict with 'ema' or 'model'); cannot load it")
    return None, loaded
