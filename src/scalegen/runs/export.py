"""Exporting a run: its final weights (EMA or raw, fp16 by default), its config without the training machine's paths,
and its tokenizer copy, side by side in a self-contained folder that every loader accepts as `--ckpt`. A sharded
checkpoint exports as the same one-file weights. (A diffusers pipeline folder: `scalegen.runs.diffusers_export`.)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from scalegen.errors import UserError
from scalegen.files import read_weights_file, save_weights_atomic, write_failure, write_json_atomic
from scalegen.runs.folder import CONFIG_FILE, EXPORTED_WEIGHTS_KEY, MODEL_FILE, TOKENIZER_FILE, find_tokenizer_copy
from scalegen.runs.names import checkpoint_path
from scalegen.runs.weights import held_weights, load_weights


def halved(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict in fp16; integer ones unchanged."""
    return {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def portable_config(stored: dict, tokenizer_copied: bool) -> dict:
    """A run's config without the training machine's paths, as an export writes it: the training data, the REPA
    (or VA-VAE alignment) encoder's file and the fine-tuning origin keep their names only (provenance; no loader reads
    their paths), and with `tokenizer_copied` the tokenizer's source is dropped (the copy beside the model is the
    source). An SD-VAE's path stays: the loaders read it (`--vae` overrides it)."""
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
