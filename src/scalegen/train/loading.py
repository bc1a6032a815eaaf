"""How the trainer reads a data set: its resumable, rank-sharded order of (index, flip) items, and whole batches
gathered on the training device (`--data-on-device`)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from scalegen.data import Subset
from scalegen.errors import UserError


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

    def epoch_items(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's items of one epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
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


class OnDevice(Dataset):
    """A data set held in memory, moved to the training device and read a whole batch at a time
    (`--data-on-device`): a batch is one indexed gather there, with no loader workers and no host-to-device copy.

    The data set needs `to(device)` and `batch(indices, flips)`: Fashion-MNIST, a latent cache, a token cache. The
    DataLoader hands the sampler's (index, flip) list to `__getitems__` and `collate` passes the batch through.
    """

    def __init__(self, dataset: Dataset, device: torch.device):
        source = dataset.dataset if isinstance(dataset, Subset) else dataset
        if not (hasattr(source, "batch") and hasattr(source, "to")):
            raise UserError(f"--data-on-device needs a data set held in memory (Fashion-MNIST, a --latent-cache or a "
                            f"--token-cache), not {type(source).__name__}")
        self.dataset, self.device = source.to(device), device
        self.length = len(dataset)
        self.channels, self.num_classes = getattr(dataset, "channels", None), getattr(dataset, "num_classes", None)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        return self.dataset[item]  # one item, as the data set gives it (its tensors now on the device)

    def __getitems__(self, items: list[tuple[int, bool]]) -> dict:
        indices = torch.tensor([index for index, _ in items], device=self.device)  # (B,)
        flips = torch.tensor([bool(flip) for _, flip in items], device=self.device)  # (B,)
        return self.dataset.batch(indices, flips)
