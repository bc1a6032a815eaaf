"""Training data: Fashion-MNIST from IDX files, ImageNet-style class folders and WebDataset-style tar shards.

Every dataset item is addressed as (index, flip): the horizontal flip is decided by the sampler from the seed and
the epoch, not by a global RNG, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import gzip
import hashlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from scalegen.classes import FASHION_MNIST_CLASSES
from scalegen.data_defaults import FASHION_MNIST_NAME
from scalegen.errors import InputWarning, UserError
from scalegen.pixels import to_model_range
from scalegen.shards import DEFAULT_IMAGES_PER_SHARD, INDEX_SUFFIX, TarSamples, write_shards

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_PADDED_SIZE = 32  # 28×28 digits-style images are zero-padded to a power of two
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049
SHARD_SOURCE_SUFFIXES = (".tar", INDEX_SUFFIX)  # `--data` names tar shards: one shard, or their JSON index


def pad_fashion_mnist(images: torch.Tensor, fill: float) -> torch.Tensor:
    """Centre 28×28 images (N, C, 28, 28) on a 32×32 canvas of `fill` (0 for uint8, -1 for [-1, 1] floats)."""
    pad = (FASHION_MNIST_PADDED_SIZE - images.shape[-1]) // 2
    return torch.nn.functional.pad(images, (pad, pad, pad, pad), value=fill)  # (N, C, 32, 32)


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


def data_identity(dataset: Dataset) -> dict:
    """What a data set's items are made from, as a cache of it records and checks (the `identity()` of scalegen's data
    sets: their files or pixels and the image size); any other data set is known by its type alone."""
    identity = getattr(dataset, "identity", None)
    return identity() if callable(identity) else {"kind": type(dataset).__name__}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((candidate for candidate in candidates if candidate.exists()), None)
    if found is None:
        raise UserError(
            f"{path.name} not found in {path.parent}; install Debian's dataset-fashion-mnist "
            "or pass --data FOLDER holding the four Fashion-MNIST IDX files"
        )
    opener = gzip.open if found.suffix == ".gz" else open
    with opener(found, "rb") as handle:
        raw = handle.read()
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic == IDX_LABEL_MAGIC:
        return np.frombuffer(raw, dtype=np.uint8, offset=8, count=count).copy()
    if magic == IDX_IMAGE_MAGIC:
        rows, columns = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
        pixels = np.frombuffer(raw, dtype=np.uint8, offset=16, count=count * rows * columns)
        return pixels.reshape(count, rows, columns).copy()
    raise UserError(f"{found} is not an IDX image or label file (magic number {magic})")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels (N,)."""
    root = Path(root) if root else FASHION_MNIST_DIR
    image_file, label_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(root / image_file), read_idx(root / label_file)
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def write_fashion_mnist_subset(folder: str | Path, count: int, split: str = "train") -> Path:
    """The first `count` Fashion-MNIST images of a split as a folder of IDX files (a small `--data FOLDER`)."""
    images, labels = load_fashion_mnist(None, split)
    count = min(count, len(labels))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_file, label_file = FASHION_MNIST_FILES[split]
    rows, columns = images.shape[1:]
    header = IDX_IMAGE_MAGIC.to_bytes(4, "big") + count.to_bytes(4, "big") + rows.to_bytes(4, "big") + columns.to_bytes(4, "big")
    (folder / image_file).write_bytes(header + images[:count].numpy().tobytes())
    header = IDX_LABEL_MAGIC.to_bytes(4, "big") + count.to_bytes(4, "big")
    (folder / label_file).write_bytes(header + labels[:count].to(torch.uint8).numpy().tobytes())
    return folder


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: halve with BOX while the short side is >= 2x the target, BICUBIC resize, center crop."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top : top + image_size, left : left + image_size])


class FashionMNIST(Dataset):
    """Fashion-MNIST in memory, zero-padded to 32×32 (then resized if another size is asked), 1 channel in [-1, 1]."""

    num_classes = len(FASHION_MNIST_CLASSES)
    channels = 1

    def __init__(self, root: str | Path | None = None, image_size: int = 32, split: str = "train"):
        images, self.labels = load_fashion_mnist(root, split)
        images = pad_fashion_mnist(images.unsqueeze(1), fill=0)  # (N, 1, 32, 32) uint8
        if image_size != FASHION_MNIST_PADDED_SIZE:
            resized = torch.nn.functional.interpolate(images.float(), size=image_size, mode="bilinear", antialias=True)
            images = resized.round().clamp(0, 255).to(torch.uint8)  # (N, 1, S, S)
        self.images = images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        image = to_model_range(self.images[index])  # (1, H, W)
        return {"image": image.flip(-1) if flip else image, "label": self.labels[index]}

    def identity(self) -> dict:
        """Its kind, image side and a digest of its pixels and labels (what a cache of it records)."""
        digest = hashlib.sha256(self.images.cpu().numpy().tobytes())
        digest.update(self.labels.cpu().numpy().tobytes())
        return {"kind": type(self).__name__, "image_size": self.images.shape[-1], "pixels": digest.hexdigest()}

    def to(self, device: torch.device) -> FashionMNIST:
        """Hold the images and labels on `device` (for `OnDevice`)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> dict:
        """The items (indices[i], flips[i]) as one batch, gathered where the data live (`OnDevice`)."""
        images = to_model_range(self.images[indices])  # (B, 1, H, W)
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)  # (B, 1, H, W)
        return {"image": images, "label": self.labels[indices]}


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
    """One labelled image of a file or its bytes, as the image data sets give it: ADM center crop, mirrored if `flip`.

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


class ImageFolder(Dataset):
    """ImageNet-style folder (one sub-folder per class), ADM center crop, 3 channels in [-1, 1].

    A file that cannot be decoded is skipped with a warning: its item is None and the collate function drops it
    and counts it, so one broken JPEG never stops an epoch.
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


class TarShards(Dataset):
    """WebDataset-style tar shards (shards.py: `KEY.jpg|png|webp` + `KEY.cls`), decoded as `ImageFolder` decodes its
    files; item i is the i-th sample counting through the shards, whose sizes (`shard_sizes`) the sampler deals out.

    Args:
        source: a brace pattern (`train-{000000..000146}.tar`), one `.tar`, or the index `pack_folder` writes, whose
            class names become `classes` (None otherwise).
        image_size: the side of the square crop.
    """

    channels = 3

    def __init__(self, source: str | Path, image_size: int):
        self.samples, self.image_size = TarSamples(source), image_size
        self.classes, self.num_classes = self.samples.classes, self.samples.num_classes
        self.shard_sizes = self.samples.shard_sizes

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self) -> dict:
        """Its kind, crop size and a digest of its shards (names, sample counts, sizes, modification times)."""
        shards = ((path.name, path, size) for path, size in zip(self.samples.paths, self.shard_sizes))
        return {"kind": type(self).__name__, "image_size": self.image_size, "files": files_digest(shards)}

    def __getitem__(self, item: tuple[int, bool]) -> dict | None:
        index, flip = item
        image, label, name = self.samples[index]
        return image_item(image, label, self.image_size, flip, name)


def pack_folder(folder: str | Path, prefix: str | Path, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                seed: int = 0) -> Path:
    """Pack an ImageNet-style class folder (JPEG, PNG or WebP files) into WebDataset-style tar shards
    `PREFIX-000000.tar`, … and their index `PREFIX.json` naming the classes (`scalegen data pack`); the images are
    shuffled with `seed` so every shard mixes the classes. Returns the index, which `--data` takes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist; pass a folder of class folders")
    classes, files = class_folder_files(folder)
    if not files:
        raise UserError(f"no images found in {folder}; expected one sub-folder per class holding image files")
    return write_shards(files, classes, prefix, images_per_shard, seed)


class Subset(Dataset):
    """The first `count` items of a data set (`--max-images`), keeping its channels, classes and class names."""

    def __init__(self, dataset: Dataset, count: int):
        self.dataset, self.count = dataset, min(count, len(dataset))
        self.channels, self.num_classes = dataset.channels, dataset.num_classes
        self.classes = getattr(dataset, "classes", None)
        if hasattr(dataset, "shard_sizes"):  # tar shards: the first shards whole, the last one cut at `count`
            starts = np.cumsum([0] + list(dataset.shard_sizes))
            self.shard_sizes = [int(min(size, self.count - start)) for start, size in zip(starts, dataset.shard_sizes)
                                if start < self.count]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item):
        return self.dataset[item]

    def identity(self) -> dict:
        """The whole data set's identity (how many of its items are used is a count beside it)."""
        return data_identity(self.dataset)


def limited(dataset: Dataset, max_images: int | None) -> Dataset:
    """The data set, or its first `max_images` items (a quick smoke test that also caches only those)."""
    return dataset if max_images is None or max_images >= len(dataset) else Subset(dataset, max_images)


def collate(items: list[dict | None] | dict) -> dict:
    """Stack dataset items into a batch, dropping (and counting) items that could not be read; a batch that an
    `OnDevice` data set gathered whole passes through."""
    if isinstance(items, dict):
        return {**items, "skipped": 0}
    kept = [item for item in items if item is not None]
    batch = {key: torch.stack([item[key] for item in kept]) for key in kept[0]} if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


def run_description(data: str, image_size: int, dataset: Dataset) -> dict:
    """What a run's config records of its data: the source, the image size and, for a folder, its class names."""
    classes = getattr(dataset, "classes", None)
    return {"data": data, "image_size": image_size, **({"classes": list(classes)} if classes else {})}


def open_dataset(data: str, image_size: int):
    """`fashion-mnist` (Debian's IDX files), a folder of Fashion-MNIST IDX files, an ImageNet-style folder, or tar
    shards: a brace pattern (`train-{000000..000146}.tar`), one `.tar`, or the `.json` index `scalegen data pack`
    writes."""
    if data == FASHION_MNIST_NAME:
        return FashionMNIST(None, image_size)
    if "{" in data or data.endswith(SHARD_SOURCE_SUFFIXES):
        return TarShards(data, image_size)
    path = Path(data)
    if (path / FASHION_MNIST_FILES["train"][0]).exists() or (path / (FASHION_MNIST_FILES["train"][0] + ".gz")).exists():
        return FashionMNIST(path, image_size)
    return ImageFolder(path, image_size)


def unflipped_loader(dataset: Dataset, batch_size: int, count: int | None = None) -> DataLoader:
    """Batches of the first `count` items (default: all) of an image dataset, in order and not mirrored."""
    count = len(dataset) if count is None else min(count, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=[(index, False) for index in range(count)],
                      collate_fn=collate)
