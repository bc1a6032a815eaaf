"""How the trainer reads a data source: its resumable, rank-sharded order of (index, flip) items — over a source
that declares sampling units (tar shards), whole units per rank — and whole batches gathered on the training device
(`--data-on-device`)."""
from __future__ import annotations

from itertools import accumulate

import torch
from torch.utils.data import Dataset, Sampler

from scalegen.data.batch import Batch
from scalegen.data.shards import SHARDS_IN_FLIGHT
from scalegen.data.source import DataSource, Subset
from scalegen.errors import UserError

EPOCH_SEED_STRIDE = 1_000_003  # (seed, epoch) seeds the generator seed · stride + epoch: seeds lie far apart


class ResumableSampler(Sampler):
    """Yields this rank's (index, flip) items of an endless sequence of seeded epochs, from any position.

    Each epoch is a permutation drawn from (seed, epoch) and dealt round-robin to ranks, truncated so every rank
    gets the same number of whole batches; flips are drawn from the same generator.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, flip: bool = True):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.flip = seed, flip
        self.batches_per_epoch = size // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset has {size} images, fewer than one global batch of {world_size * batch_size}; "
                "lower --batch-size or add images"
            )
        self.start_batch = 0  # global batch counter to resume from

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator every rank draws epoch `epoch`'s order and flips from."""
        return torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)

    def epoch_items(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's items of one epoch, in order."""
        generator = self.epoch_generator(epoch)
        order = torch.randperm(self.size, generator=generator)  # (N,)
        flips = torch.randint(0, 2, (self.size,), generator=generator).bool() & self.flip  # (N,)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:used][self.rank :: self.world_size].tolist()
        return [(index, bool(flips[index])) for index in mine]

    def __iter__(self):
        epoch, batch_in_epoch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            items = self.epoch_items(epoch)
            yield from items[batch_in_epoch * self.batch_size :]
            epoch, batch_in_epoch = epoch + 1, 0


class ShardSampler(ResumableSampler):
    """`ResumableSampler` over tar shards: each rank reads only its own shards, a different deal every epoch.

    Each epoch draws a permutation of the shards from (seed, epoch) and deals it round-robin to ranks (rank r gets
    shards r, r + W, …); a rank shuffles its items within groups of SHARDS_IN_FLIGHT consecutive shards of its list,
    so a loader keeps only a few shards open. Every rank yields the same number of whole batches each epoch: as many
    as the smallest shards a rank can be dealt hold, the same in every epoch, so `start_batch` resumes exactly.
    """

    def __init__(self, shard_sizes: list[int], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 flip: bool = True):
        if len(shard_sizes) < world_size:
            raise UserError(f"the data have {len(shard_sizes)} shards, fewer than the {world_size} ranks that each read "
                            f"their own; pack into at least {world_size} shards (scalegen data pack --images-per-shard)")
        super().__init__(sum(shard_sizes), batch_size, rank, world_size, seed, flip)
        self.shard_sizes = list(shard_sizes)
        self.shard_starts = [0, *accumulate(self.shard_sizes)][:-1]  # each shard's first item
        fewest = sum(sorted(self.shard_sizes)[: len(self.shard_sizes) // world_size])  # items a rank surely gets
        self.batches_per_epoch = fewest // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"a rank's {len(self.shard_sizes) // world_size} smallest shards hold {fewest} images, fewer "
                            f"than one batch of {batch_size} per rank; lower --batch-size or pack larger shards")

    def epoch_items(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's items of one epoch, in order."""
        generator = self.epoch_generator(epoch)
        shard_order = torch.randperm(len(self.shard_sizes), generator=generator).tolist()
        flips = (torch.randint(0, 2, (self.size,), generator=generator).bool() & self.flip).tolist()  # (N,)
        mine = shard_order[self.rank :: self.world_size]
        order: list[int] = []
        for first in range(0, len(mine), SHARDS_IN_FLIGHT):
            group = torch.cat([torch.arange(self.shard_starts[shard], self.shard_starts[shard] + self.shard_sizes[shard])
                               for shard in mine[first : first + SHARDS_IN_FLIGHT]])  # (G,)
            order += group[torch.randperm(len(group), generator=generator)].tolist()
        return [(index, flips[index]) for index in order[: self.batches_per_epoch * self.batch_size]]


def epoch_sampler(source: DataSource, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  flip: bool = True) -> ResumableSampler:
    """The trainer's sampler of (index, flip) items, chosen by the sampling units the source declares: whole units
    per rank where it has them (`shard_sizes`: tar shards, a cache read beside them), else a permutation of all items
    dealt round-robin.

    Args:
        source: the training data.
        batch_size: one rank's micro-batch.
        rank, world_size: this process's place among the ranks.
        seed, flip: the order's seed; whether half the items are mirrored.
    """
    if source.shard_sizes is None:
        return ResumableSampler(len(source), batch_size, rank, world_size, seed, flip)
    return ShardSampler(source.shard_sizes, batch_size, rank, world_size, seed, flip)


class OnDevice(DataSource):
    """A source `held_in_memory`, moved to the training device and read a whole batch at a time
    (`--data-on-device`): a batch is one indexed gather there, with no loader workers and no host-to-device copy.

    Fashion-MNIST, a latent cache and a token cache are held in memory. The DataLoader hands the sampler's
    (index, flip) list to `__getitems__`, and `collate` passes the `Batch` it returns through.
    """

    held_in_memory = True

    def __init__(self, source: Dataset, device: torch.device):
        if not (isinstance(source, DataSource) and source.held_in_memory):
            named = source.dataset if isinstance(source, Subset) else source
            raise UserError(f"--data-on-device needs a data set held in memory (Fashion-MNIST, a --latent-cache or a "
                            f"--token-cache), not {type(named).__name__}")
        self.dataset, self.device = source.to(device), device
        self.form, self.channels, self.num_classes = source.form, source.channels, source.num_classes
        self.classes, self.shard_sizes = source.classes, source.shard_sizes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        return self.dataset[item]  # one item, as the source gives it (its tensors now on the device)

    def __getitems__(self, items: list[tuple[int, bool]]) -> Batch:
        indices = torch.tensor([index for index, _ in items], device=self.device)  # (B,)
        flips = torch.tensor([bool(flip) for _, flip in items], device=self.device)  # (B,)
        return self.batch(indices, flips)

    def identity(self) -> dict:
        return self.dataset.identity()

    def to(self, device: torch.device) -> OnDevice:
        return OnDevice(self.dataset, device)

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> Batch:
        return self.dataset.batch(indices, flips)
