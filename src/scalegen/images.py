"""Generated images in one range contract, and where they go: PIL images and class-grid PNGs (ADM-format .npz sample
files: `scalegen.eval.samples`).

The contract: every sampling call of scalegen (`DiT.generate`, `VAR.generate`, `VAR.edit`) returns float images
(B, C, H, W) in [0, 1], C being 1 (grayscale) or 3 (RGB). Everything here takes images in that range.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from scalegen.classes import class_ids
from scalegen.data.folder import center_crop_arr
from scalegen.errors import UserError

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
