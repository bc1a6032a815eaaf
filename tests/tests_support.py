"""Shared helpers for the tests: tiny data sets and models that run in a blink on 2 CPU cores."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from scalegen.cli.main import main
from scalegen.data import FASHION_MNIST_FILES, IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, FashionMNIST, load_fashion_mnist

FASHION_SUBSET = 512
SUBSET_IMAGES = 256


class Subset(Dataset):
    """The first `count` items of a dataset, keeping its channels and number of classes."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count
        self.channels, self.num_classes = dataset.channels, dataset.num_classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item):
        return self.dataset[item]


def tiny_fashion(image_size: int = 8) -> Subset:
    """512 real Fashion-MNIST images, resized to image_size (8×8 keeps a DiT with patch 4 at 4 tokens)."""
    return Subset(FashionMNIST(None, image_size), FASHION_SUBSET)


def write_fashion_subset(folder: Path) -> Path:
    """The first SUBSET_IMAGES real Fashion-MNIST images as a folder of IDX files (a quick `--data FOLDER`)."""
    images, labels = load_fashion_mnist()
    count = SUBSET_IMAGES
    image_file, label_file = FASHION_MNIST_FILES["train"]
    header = IDX_IMAGE_MAGIC.to_bytes(4, "big") + count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (folder / image_file).write_bytes(header + images[:count].numpy().tobytes())
    header = IDX_LABEL_MAGIC.to_bytes(4, "big") + count.to_bytes(4, "big")
    (folder / label_file).write_bytes(header + labels[:count].to(torch.uint8).numpy().tobytes())
    return folder


def user_error(argv: list[str], capsys) -> str:
    """Run the command line expecting a UserError: exit code 2 and a one-line message, which is returned."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("scalegen: error:") and "\n" not in message
    return message


def without_progress_bars(text: str) -> str:
    """A subprocess's stderr less tqdm's lines, so the first error shows up in an assertion message."""
    return "\n".join(line for line in text.splitlines() if "it/s]" not in line and "s/it]" not in line)[:4000]
