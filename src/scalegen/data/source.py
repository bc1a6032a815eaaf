"""The data source protocol (`DataSource`) that every source of training data follows — class folders, tar shards,
Fashion-MNIST, a latent or token cache, a toy registered from a test — and what wraps one: `Subset` (`--max-images`).

Every item is addressed as (index, flip): the horizontal flip is decided by the sampler from the seed and the epoch,
not by a global RNG, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from itertools import accumulate

import torch
from torch.utils.data import DataLoader, Dataset

from scalegen.data.batch import Batch, collate
from scalegen.data.names import Form, IMAGES


class DataSource(Dataset, ABC):
    """What the trainer, the samplers and the caches know of a data source; a subclass declares what differs.

    Attributes:
        form: what its items hold (names.IMAGES: {"image", "label"}; LATENTS: {"latent", "label"} and "image" beside
            them for REPA; TOKENS: {"tokens", "label"}), and so what its batches hold (`Batch`).
        channels: its images' channels (None where its items hold no images of its own: a cache).
        num_classes: how many classes its labels count (None where it does not know: a cache).
        classes: its class names (None where it has none: Fashion-MNIST's are known by `scalegen.classes`).
        shard_sizes: its sampling units: the sizes of the runs of consecutive items read together (tar shards), which
            the sampler deals whole to the ranks; None: any item may be read anywhere.
        held_in_memory: its items are tensors in memory, so it can be moved to a device (`to`) and gathered a whole
            batch at a time there (`batch`): `--data-on-device`.
    """

    form: Form = IMAGES
    channels: int | None = None
    num_classes: int | None = None
    classes: list[str] | None = None
    shard_sizes: list[int] | None = None
    held_in_memory: bool = False

    @abstractmethod
    def __len__(self) -> int:
        """How many items it holds."""

    @abstractmethod
    def __getitem__(self, item: tuple[int, bool]) -> dict | None:
        """Item `index`, mirrored if `flip`, as a dict named by `Batch`'s fields; None when it cannot be read."""

    def identity(self) -> dict:
        """What its items are made from, as a cache of it records and checks (its files or pixels, the image size);
        by default its kind alone."""
        return {"kind": type(self).__name__}

    def to(self, device: torch.device) -> DataSource:
        """Hold its items on `device` (a source `held_in_memory`)."""
        raise NotImplementedError(f"{type(self).__name__} is not held in memory")

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> Batch:
        """The items (indices[i], flips[i]) (B,) as one batch, gathered where they are held (a source
        `held_in_memory`)."""
        raise NotImplementedError(f"{type(self).__name__} is not held in memory")


class Subset(DataSource):
    """The first `count` items of a source (`--max-images`), keeping its form, channels, classes and identity; of tar
    shards, the first shards whole and the last one cut at `count`."""

    def __init__(self, source: DataSource, count: int):
        self.dataset, self.count = source, min(count, len(source))
        self.form, self.channels, self.num_classes = source.form, source.channels, source.num_classes
        self.classes, self.held_in_memory = source.classes, source.held_in_memory
        if source.shard_sizes is not None:
            starts = [0, *accumulate(source.shard_sizes)]
            self.shard_sizes = [min(size, self.count - start) for start, size in zip(starts, source.shard_sizes)
                                if start < self.count]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item: tuple[int, bool]) -> dict | None:
        return self.dataset[item]

    def identity(self) -> dict:
        """The whole source's identity (how many of its items are used is a count beside it)."""
        return self.dataset.identity()

    def to(self, device: torch.device) -> Subset:
        self.dataset = self.dataset.to(device)
        return self

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> Batch:
        return self.dataset.batch(indices, flips)


def limited(source: DataSource, max_images: int | None) -> DataSource:
    """The source, or its first `max_images` items (a quick smoke test that also caches only those)."""
    return source if max_images is None or max_images >= len(source) else Subset(source, max_images)


def run_description(data: str, image_size: int, source: DataSource) -> dict:
    """What a run's config records of its data: the `--data` string, the image size and the class names, if any."""
    return {"data": data, "image_size": image_size, **({"classes": list(source.classes)} if source.classes else {})}


def unflipped_loader(source: DataSource, batch_size: int, count: int | None = None) -> DataLoader:
    """Batches of the first `count` items (default: all) of a source, in order and not mirrored."""
    count = len(source) if count is None else min(count, len(source))
    return DataLoader(source, batch_size=batch_size, sampler=[(index, False) for index in range(count)],
                      collate_fn=partial(collate, form=source.form))
