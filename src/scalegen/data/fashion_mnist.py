"""Fashion-MNIST as a data source: the IDX files of Debian's `dataset-fashion-mnist` package or of any folder, held in
memory (so `--data-on-device` can hold it on the training device)."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from scalegen.classes import FASHION_MNIST_CLASSES
from scalegen.data.batch import Batch
from scalegen.data.names import IMAGES
from scalegen.data.source import DataSource
from scalegen.errors import UserError
from scalegen.pixels import to_model_range

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_PADDED_SIZE = 32  # 28×28 digits-style images are zero-padded to a power of two
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049


def pad_fashion_mnist(images: torch.Tensor, fill: float) -> torch.Tensor:
    """Centre 28×28 images (N, C, 28, 28) on a 32×32 canvas of `fill` (0 for uint8, -1 for [-1, 1] floats)."""
    pad = (FASHION_MNIST_PADDED_SIZE - images.shape[-1]) // 2
    return torch.nn.functional.pad(images, (pad, pad, pad, pad), value=fill)  # (N, C, 32, 32)


def holds_fashion_mnist(folder: str | Path) -> bool:
    """Whether a folder holds Fashion-MNIST's IDX files (its training images, plain or gzipped)."""
    images = Path(folder) / FASHION_MNIST_FILES["train"][0]
    return images.exists() or images.with_name(images.name + ".gz").exists()


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


class FashionMNIST(DataSource):
    """Fashion-MNIST in memory, zero-padded to 32×32 (then resized if another size is asked), 1 channel in [-1, 1]."""

    num_classes = len(FASHION_MNIST_CLASSES)
    channels = 1
    held_in_memory = True

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

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> Batch:
        """The items (indices[i], flips[i]) as one batch, gathered where the data live (`OnDevice`)."""
        images = to_model_range(self.images[indices])  # (B, 1, H, W)
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)  # (B, 1, H, W)
        return Batch(IMAGES, label=self.labels[indices], image=images)
