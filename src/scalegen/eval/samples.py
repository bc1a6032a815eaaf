"""The sample files of the FID protocol: class-balanced labels, samples drawn over ranks and streamed into an ADM
.npz (`arr_0` uint8 NHWC) beside their labels, which classes those are and how they were drawn (what `scalegen eval`
reads back through `scalegen.eval.npz`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scalegen.distributed import DistributedContext, gather_tensors
from scalegen.eval.npz import (
    CLASS_NAMES_KEY, IMAGES_KEY, LABELS_KEY, NUM_CLASSES_KEY, PROTOCOL_KEY, NpzWriter, write_npz,
)
from scalegen.files import replace_atomically
from scalegen.images import to_uint8
from scalegen.models.sampling_settings import LABEL_DRAWS, LabelDraw


def to_adm_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> uint8 (N, H, W, 3) as ADM's sample files (grayscale repeated to 3 channels)."""
    pixels = to_uint8(images.detach().cpu())  # (N, C, H, W)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)  # (N, 3, H, W)
    return pixels.permute(0, 2, 3, 1).numpy()


def class_arrays(num_classes: int, class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays that say which classes a sample file's labels are: `num_classes` and, when given, `class_names`."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return {NUM_CLASSES_KEY: np.array(num_classes),
            **({} if class_names is None else {CLASS_NAMES_KEY: np.array([str(name) for name in class_names])})}


def save_npz(images: np.ndarray, path: str | Path, labels: np.ndarray | None = None,
             class_names: Sequence[str] | None = None) -> Path:
    """Write uint8 images (N, H, W, 3) as an ADM-format .npz (`arr_0`); written to a temporary name first.

    The class labels, when given, go in an extra `labels` array (the ADM evaluator reads only `arr_0`); the names of
    the classes they index, when given, in `class_names` (with their count, `num_classes`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {IMAGES_KEY: images, **({} if labels is None else {LABELS_KEY: labels}),
              **({} if class_names is None else class_arrays(len(class_names), class_names))}
    replace_atomically(path, lambda temporary: write_npz(temporary, arrays))
    return path


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Class-balanced labels: arange(num_samples) % num_classes shuffled with `seed` (ADM/RAE's FID protocol), so
    each class comes num_samples // num_classes times, the first num_samples % num_classes classes once more.

    Returns:
        (num_samples,) int64 labels, the same on every machine and for any number of ranks.
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))  # (N,)
    return (torch.arange(num_samples) % num_classes)[order]


def sample_to_npz(
    draw: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    num_samples: int,
    batch_size: int,
    seed: int,
    path: str | Path,
    context: DistributedContext,
    class_names: Sequence[str] | None = None,
    label_draw: LabelDraw = "balanced",
) -> Path | None:
    """Draw `num_samples` labelled samples, sharded over ranks, into an ADM .npz (`arr_0`, `labels`, which classes the
    labels are: `num_classes`, `class_names` when given — `eval --features fmnist` reads them — and how they were
    drawn: `protocol`, a JSON string that `eval` prints).

    The labels (`label_draw`): "balanced" gives the file exactly `balanced_labels(num_samples, num_classes, seed)`
    whatever the number of ranks (each rank takes its slice of every gathered batch); "random" draws each uniformly
    from the global RNG, per rank. Each rank seeds the global RNG with seed·world + rank (as DiT's sample_ddp.py) and
    draws its share in batches; rank 0 gathers every batch and streams it into the file, so the samples never sit in
    memory all at once.

    Args:
        draw: labels (b,) on the context's device -> images (b, C, H, W) in [0, 1], drawn from the global RNG.
        num_classes, num_samples, batch_size, seed: what to draw.
        path: the .npz to write (through a temporary name).
        context: this process's place in the torchrun group.
        class_names: the names of the model's classes (`model.class_names`), stored beside the labels.
        label_draw: "balanced" or "random" (`LABEL_DRAWS`).
    Returns:
        The path written (rank 0), or None on other ranks.
    """
    if label_draw not in LABEL_DRAWS:
        raise ValueError(f"label_draw {label_draw!r} is not one of {LABEL_DRAWS}")
    per_rank = math.ceil(num_samples / context.world_size)
    drawn = per_rank * context.world_size  # the last gathered batch may run past num_samples: its tail is dropped
    if label_draw == "balanced":  # the file's labels in order, then labels for the dropped tail (< one per rank)
        planned = torch.cat([balanced_labels(num_samples, num_classes, seed),
                             torch.arange(drawn - num_samples) % num_classes])  # (world·per_rank,)
    protocol = {"labels": label_draw, "num_samples": num_samples, "num_classes": num_classes, "seed": seed,
                "world_size": context.world_size, "batch_size": batch_size}
    torch.manual_seed(seed * context.world_size + context.rank)
    path = Path(path)
    temporary = path.with_name(path.stem + ".partial.npz")
    writer, written, all_labels = None, 0, []
    progress = tqdm(total=drawn, desc="sampling", unit="img", disable=not context.is_main)
    try:
        for start in range(0, per_rank, batch_size):
            count = min(batch_size, per_rank - start)
            if label_draw == "balanced":
                # gathered in rank order after the start·world samples before: this rank's slice of the plan
                offset = start * context.world_size + context.rank * count
                labels = planned[offset:offset + count].to(context.device)  # (b,)
            else:
                labels = torch.randint(0, num_classes, (count,), device=context.device)  # (b,)
            images = torch.from_numpy(to_adm_uint8(draw(labels))).to(context.device)  # (b, H, W, 3)
            images, labels = gather_tensors(images, context), gather_tensors(labels, context)  # (world·b, …)
            if context.is_main:
                if writer is None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writer = NpzWriter(temporary)
                    writer.begin_images((num_samples, *images.shape[1:]))
                keep = min(len(images), num_samples - written)
                writer.add_images(images[:keep].cpu().numpy())
                all_labels.append(labels[:keep].cpu().numpy())
                written += keep
            progress.update(count * context.world_size)
        progress.close()
        if not context.is_main:
            return None
        writer.add_array(LABELS_KEY, np.concatenate(all_labels))
        for name, array in class_arrays(num_classes, class_names).items():
            writer.add_array(name, array)
        writer.add_array(PROTOCOL_KEY, np.array(json.dumps(protocol)))
        writer.close()
        temporary.replace(path)
    finally:
        if context.is_main:  # rank 0 alone writes the file: an interrupted or failed write leaves nothing behind
            temporary.unlink(missing_ok=True)
    return path
