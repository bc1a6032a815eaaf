"""ImageNet-style class folders (one sub-folder per class) as a data source, and what every image source shares: the
ADM center crop, an image file's item, a digest of files that a cache records."""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from scalegen.data.source import DataSource
from scalegen.errors import InputWarning, UserError
from scalegen.pixels import to_model_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def files_digest(files: Iterable[tuple[str, Path, int]]) -> str:
    """A digest of files (name, path, a number beside each: its label or sample count) by their names, numbers, sizes
    and modification times: it changes when a file is added, removed, renamed, rewritten or relabelled, and reads none.

    Raises:
        UserError: a file cannot be looked at.
    """
    digest = hashlib.sha256()
    for name, path, number in files:
        try:
            status = path.stat()
        except OSError as error:
            raise UserError(f"cannot read {path} ({error.strerror}); check --data") from None
        digest.update(f"{name}\t{number}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: halve with BOX while the short side is >= 2x the target, BICUBIC resize, center crop."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top : top + image_size, left : left + image_size])


def class_folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """An ImageNet-style folder's class names (its sorted sub-folders) and its (image file, label) pairs, in order."""
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return classes, files


def image_item(source: str | Path | BinaryIO, label: int, image_size: int, flip: bool, name: str) -> dict | None:
    """One labelled image of a file or its bytes, as the image sources give it: ADM center crop, mirrored if `flip`.

    Args:
        source: the image file or a stream of its bytes (any format PIL reads).
        label: its class id.
        image_size: the side of the square crop.
        flip: mirror it horizontally.
        name: how a warning names the image.
    Returns:
        {"image": (3, S, S) float in [-1, 1], "label": int64 0-dim}, or None (with a warning) when it cannot be decoded.
    """
    try:
        with Image.open(source) as handle:
            image = center_crop_arr(handle.convert("RGB"), image_size)
    except (OSError, ValueError) as error:
        warnings.warn(InputWarning(f"skipping unreadable image {name}: {error}"), stacklevel=3)
        return None
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
    pixels = to_model_range(pixels)  # (3, H, W)
    return {"image": pixels.flip(-1) if flip else pixels, "label": torch.tensor(label)}


class ImageFolder(DataSource):
    """ImageNet-style folder (one sub-folder per class), ADM center crop, 3 channels in [-1, 1].

    A file that cannot be decoded is skipped with a warning: its item is None and `collate` drops it and counts it,
    so one broken JPEG never stops an epoch.
    """

    channels = 3

    def __init__(self, root: str | Path, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"data folder {root} does not exist; pass --data fashion-mnist or a folder of class folders")
        self.classes, self.files = class_folder_files(root)
        if not self.files:
            raise UserError(
                f"no images found in {root}; expected one sub-folder per class holding {'/'.join(IMAGE_EXTENSIONS)} files"
            )
        self.num_classes = len(self.classes)
        self.root, self.image_size = root, image_size

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> dict:
        """Its kind, crop size and a digest of its files (names in the folder, labels, sizes, modification times)."""
        files = ((path.relative_to(self.root).as_posix(), path, label) for path, label in self.files)
        return {"kind": type(self).__name__, "image_size": self.image_size, "files": files_digest(files)}

    def __getitem__(self, item: tuple[int, bool]) -> dict | None:
        index, flip = item
        path, label = self.files[index]
        return image_item(path, label, self.image_size, flip, str(path))
