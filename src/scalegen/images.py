"""Generated images in one range contract, and where they go: PIL images, class-grid PNGs and ADM-format .npz files.

The contract: every sampling call of scalegen (`DiT.generate`, `VAR.generate`, `VAR.edit`) returns float images
(B, C, H, W) in [0, 1], C being 1 (grayscale) or 3 (RGB). Everything here takes images in that range.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from scalegen.classes import class_ids
from scalegen.data.folder import center_crop_arr
from scalegen.distributed import DistributedContext, gather_tensors
from scalegen.errors import UserError
from scalegen.eval.npz import (
    CLASS_NAMES_KEY, IMAGES_KEY, LABELS_KEY, NUM_CLASSES_KEY, PROTOCOL_KEY, NpzWriter, write_npz,
)
from scalegen.files import replace_atomically
from scalegen.models.sampling_settings import LABEL_DRAWS, LabelDraw

UINT8_MAX = 255
LABEL_PADDING = 4  # pixels around a grid row's name
IMAGE_OUTPUT_ADVICE = "name a .png or .jpg (or another format PIL writes: .webp, .bmp, .tif, …)"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 in [0, 255], rounded to the nearest level (values outside [0, 1] are clamped)."""
    return (images.float() * UINT8_MAX + 0.5).clamp(0, UINT8_MAX).to(torch.uint8)


def check_image_output(path: str | Path, advice: str = IMAGE_OUTPUT_ADVICE) -> None:
    """Before drawing: `path` must name an image format PIL writes (.png, .jpg, …); else a one-line error ending in
    `advice`."""
    suffix = Path(path).suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise UserError(f"--out {path}: {suffix or 'no extension'} is no image format; {advice}")


def check_output(path: str | Path, num_samples: int) -> None:
    """Before sampling: `.npz` takes `num_samples` samples, an image file (.png, .jpg, …) a class grid."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz" and num_samples <= 0:
        raise UserError(f"--out {path} writes ADM samples: give --num-samples N, or name a .png for a class grid")
    if suffix != ".npz" and num_samples > 0:
        raise UserError(f"--num-samples writes an ADM .npz, not {suffix or 'a file without extension'}: "
                        f"name --out with .npz, or drop --num-samples for a class grid")
    if suffix != ".npz":
        check_image_output(path, "name a .png (class grid) or .npz (with --num-samples)")


def parse_classes(classes: str | Sequence[int | str], num_classes: int, names: Sequence[str] | None = None) -> list[int]:
    """Class ids from "all", "0,1,2", "golden retriever,7" or a sequence of ids and names (see `classes.class_ids`)."""
    return class_ids(classes, names if names is not None else [f"class {index}" for index in range(num_classes)])


def grid_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """Labels laid out one row per class: (len(classes) * per_class,)."""
    return torch.tensor(list(classes)).repeat_interleave(per_class)


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """Images (N, C, H, W) in [0, 1] tiled row by row into one PIL image with `rows` rows (grayscale when C == 1)."""
    pixels = to_uint8(images.detach().cpu())  # (N, C, H, W)
    count, channels, height, width = pixels.shape
    columns = -(-count // rows)
    canvas = torch.zeros(channels, rows * height, columns * width, dtype=torch.uint8)  # (C, rows·H, cols·W)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        canvas[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    array = canvas.permute(1, 2, 0).numpy()  # (rows·H, cols·W, C)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, C, H, W) in [0, 1] -> one PIL image each ("L" for one channel, "RGB" for three)."""
    return [image_grid(image.unsqueeze(0), 1) for image in images]


def labelled(grid: Image.Image, row_names: Sequence[str]) -> Image.Image:
    """A grid with each row's name written in a margin on its left."""
    font = ImageFont.load_default()
    margin = LABEL_PADDING * 2 + max(int(font.getlength(name)) for name in row_names)
    row_height = grid.height // len(row_names)
    canvas = Image.new(grid.mode, (grid.width + margin, grid.height), color=0)
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(row_names):
        draw.text((LABEL_PADDING, row * row_height + row_height // 2), name, fill=UINT8_MAX if grid.mode == "L" else
                  (UINT8_MAX,) * 3, font=font, anchor="lm")
    return canvas


def save_grid(images: torch.Tensor, rows: int, path: str | Path, row_names: Sequence[str] | None = None) -> Path:
    """Save images (N, C, H, W) in [0, 1] as one PNG with `rows` rows, optionally with each row's name on its left;
    returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, rows)
    (labelled(grid, row_names) if row_names else grid).save(path)
    return path


def picture_tensor(picture: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image, center-cropped and resized to image_size (ADM's crop), as (1, channels, S, S) in [0, 1]."""
    image = center_crop_arr(picture.convert("L" if channels == 1 else "RGB"), image_size)
    pixels = torch.from_numpy(np.array(image)).reshape(image_size, image_size, channels).permute(2, 0, 1)  # (C, S, S)
    return (pixels.float() / UINT8_MAX).unsqueeze(0)  # (1, C, S, S)


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """An image file, as `picture_tensor` makes it: (1, channels, S, S) in [0, 1]."""
    try:
        with Image.open(path) as handle:
            return picture_tensor(handle, image_size, channels)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path} ({error}); pass a PNG or JPEG file") from None


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
