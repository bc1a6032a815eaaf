"""The one batch type the trainer and the tasks see (`Batch`), and `collate`, which stacks a data source's items into
one. What a batch holds follows its source's form (`DataSource.form`), decided where the source was opened."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from scalegen.data.names import Form


@dataclass
class Batch:
    """A micro-batch of one data source's items.

    Args:
        form: what its items hold, as its source says (names.IMAGES, LATENTS or TOKENS).
        label: (B,) int64 class ids.
        image: (B, C, H, W) in [-1, 1]: the images form's data, or the images beside cached latents (REPA).
        latent: (B, C_latent, h, w): a latent cache's samples.
        tokens: (B, L): a token cache's ids over all scales.
        index: (B,) the items' indices in their source (a cache's extraction records them).
        skipped: how many items of the batch could not be read and were dropped.
    """

    form: Form
    label: torch.Tensor
    image: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    index: torch.Tensor | None = None
    skipped: int = 0

    def __len__(self) -> int:
        """The number of examples it holds."""
        return len(self.label)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with its tensors on `device`."""
        moved = {field.name: getattr(self, field.name).to(device, non_blocking=non_blocking) for field in fields(self)
                 if isinstance(getattr(self, field.name), torch.Tensor)}
        return replace(self, **moved)


def collate(items: list[dict | None] | Batch, form: Form) -> Batch:
    """Stack a source's items (dicts named by `Batch`'s fields) into a batch, dropping (and counting) items that could
    not be read (None); a batch that an `OnDevice` source gathered whole passes through."""
    if isinstance(items, Batch):
        return items
    kept = [item for item in items if item is not None]
    stacked = ({key: torch.stack([item[key] for item in kept]) for key in kept[0]} if kept
               else {"label": torch.zeros(0, dtype=torch.long)})
    return Batch(form, skipped=len(items) - len(kept), **stacked)

