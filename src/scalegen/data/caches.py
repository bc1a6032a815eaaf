"""One-time caches of a data source in a latent space, each a data source of its own (`DataSource`), addressed by
(index, flip) like the image sources; their form is decided here: latents or tokens.

The latent cache (DiT) stores the posterior mean and standard deviation of every image and of its mirror image, so
training still draws a fresh latent sample each time (as on-the-fly encoding does) and keeps the random flip. The
token cache (VAR) stores every image's and mirror's tokens over all scales. Both are built by every rank and read
memory-mapped (data/store.py), and record what they were made from: the source's identity (its files and image
size) and a digest of the encoder's weights, so a run with other data or another VAE or tokenizer of the same shapes
is refused instead of training on the old latents. The encoders are arguments: the wing imports no tokenizer.

A latent cache read beside the tar shards it was made from (REPA's encoder needs the images) keeps their locality:
it declares as its sampling units (`shard_sizes`) its items by source shard, so the trainer deals it whole shards as
it deals the shards themselves (data/sampling.py), and each rank opens each of its shards once an epoch instead of a
shard per image.
"""
from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from scalegen.data.batch import Batch
from scalegen.data.names import LATENTS, TOKENS
from scalegen.data.sampling import OnDevice
from scalegen.data.source import DataSource
from scalegen.data.store import build_cache, CACHE_SHARD_SIZE, CachedArrays, INDICES, LABELS, weights_digest
from scalegen.distributed import DistributedContext

LATENT_BATCH_SIZE = 32
TOKEN_BATCH_SIZE = 64


def cache_path(folder: Path, earlier_file: Path) -> Path:
    """Where a run's cache lies: its sharded folder, or a cache of the earlier one-file format when only that exists."""
    return earlier_file if earlier_file.exists() and not folder.exists() else folder


class DistributionEncoder(Protocol):
    """What a latent cache needs of its encoder (an SD-VAE's `LatentCodec`, a tokenizer's `TokenizerLatents`)."""

    latent_network: nn.Module  # the network whose weights the cache records

    def to(self, device: torch.device | str) -> DistributionEncoder: ...

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> the latents' mean and standard deviation, (B, C_latent, h, w) each."""


class TokenEncoder(Protocol):
    """What a token cache needs of its tokenizer (a multi-scale `VQVAE`): an nn.Module with these."""

    vocab_size: int

    def img_to_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> the token ids of each scale, K × (B, p²)."""


def cache_source(dataset: DataSource, encoder: nn.Module) -> dict:
    """What a cache records of its making: the source's identity and a digest of the encoder's weights."""
    return {"data": dataset.identity(), "encoder": weights_digest(encoder)}


def source_shard_sizes(arrays: CachedArrays, shard_sizes: list[int]) -> list[int]:
    """How many of a cache's items come from each source shard (sizes `shard_sizes`); the items lie in their source
    order, so each shard's items are consecutive in the cache."""
    sources = arrays.column(INDICES)  # (N,) each item's index in the data set, increasing
    starts = torch.tensor([0, *accumulate(shard_sizes)][:-1])  # (S,) each shard's first index
    shards = torch.searchsorted(starts, sources, right=True) - 1  # (N,)
    return torch.bincount(shards, minlength=len(shard_sizes)).tolist()


class LatentCache(DataSource):
    """Cached latents addressed by (index, flip), as the image sources; yields a fresh sample each time, and the
    image itself too when the source it was made from is given (REPA's encoder needs it).

    Beside images with sampling units (tar shards), its own units are its items by source shard, so that the
    trainer's sampler reads the shards whole (data/sampling.py `epoch_sampler`).
    """

    form = LATENTS
    held_in_memory = True  # the images beside it too, or `to` says they are not

    def __init__(self, path: str | Path, images: DataSource | None = None):
        self.arrays = CachedArrays(path)  # "mean", "std": (N, 2, C_latent, h, w) fp16, memory-mapped
        self.images = images
        if images is not None and images.shard_sizes is not None:
            self.shard_sizes = source_shard_sizes(self.arrays, images.shard_sizes)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        mean = self.arrays.row("mean", index, flip).float()  # (C_latent, h, w)
        std = self.arrays.row("std", index, flip).float()  # (C_latent, h, w)
        item_data = {"latent": mean + std * torch.randn_like(mean), "label": self.arrays.row(LABELS, index)}
        if self.images is not None:
            item_data["image"] = self.images[(int(self.arrays.row(INDICES, index)), flip)]["image"]  # (C, H, W)
        return item_data

    def to(self, device: torch.device) -> LatentCache:
        """Hold the cache (and the images beside it) on `device` (for `OnDevice`)."""
        self.arrays = self.arrays.to(device)
        if self.images is not None:
            self.images = OnDevice(self.images, device)
        return self

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> Batch:
        """The items (indices[i], flips[i]) as one batch, a fresh latent sample each (`OnDevice`)."""
        mean = self.arrays.rows("mean", indices, flips).float()  # (B, C_latent, h, w)
        std = self.arrays.rows("std", indices, flips).float()  # (B, C_latent, h, w)
        latent = mean + std * torch.randn_like(mean)  # (B, C_latent, h, w)
        images = None
        if self.images is not None:
            sources = self.arrays.rows(INDICES, indices)  # (B,)
            images = self.images.batch(sources, flips.bool()).image  # (B, C, H, W)
        return Batch(LATENTS, label=self.arrays.rows(LABELS, indices), latent=latent, image=images)


def extract_latents(
    codec: DistributionEncoder, dataset: DataSource, path: str | Path, batch_size: int = LATENT_BATCH_SIZE,
    device: torch.device | str = "cpu", context: DistributedContext | None = None, shard_size: int = CACHE_SHARD_SIZE,
    num_workers: int = 0,
) -> Path:
    """Encode every image and its mirror once into the sharded cache `path` (fp16 mean and std), split over the ranks
    of `context` (see `build_cache`); a cache of other data or of another codec's weights is refused."""
    codec = codec.to(device)

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, std = codec.encode_distribution(images)  # (2B, C_latent, h, w) ×2
        return {"mean": mean.half(), "std": std.half()}

    source = cache_source(dataset, codec.latent_network)
    return build_cache(dataset, encode, path, batch_size, device, "extracting latents", source, context, shard_size,
                       num_workers)


class TokenCache(DataSource):
    """Pre-extracted tokens of every image and its mirror, addressed by (index, flip) like the image sources."""

    form = TOKENS
    held_in_memory = True

    def __init__(self, path: str | Path):
        self.arrays = CachedArrays(path)  # "tokens": (N, 2, L) int16/int32 (or (N, 2, L, c) float32), memory-mapped

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        return {"tokens": widened(self.arrays.row("tokens", index, flip)), "label": self.arrays.row(LABELS, index)}

    def to(self, device: torch.device) -> TokenCache:
        """Hold the tokens on `device` (for `OnDevice`)."""
        self.arrays = self.arrays.to(device)
        return self

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> Batch:
        """The items (indices[i], flips[i]) as one batch (`OnDevice`)."""
        tokens = widened(self.arrays.rows("tokens", indices, flips))  # (B, L, ...)
        return Batch(TOKENS, label=self.arrays.rows(LABELS, indices), tokens=tokens)


def widened(tokens: torch.Tensor) -> torch.Tensor:
    """Stored tokens as a head reads them: integer ids as int64, continuous ones (a flow head's) as float32."""
    return tokens.float() if tokens.is_floating_point() else tokens.long()


class TokenTargets(Protocol):
    """What a VAR token head says a cached token is (`scalegen.models.token_heads.TokenHead`)."""

    def targets(self, tokenizer: nn.Module, images: torch.Tensor) -> list[torch.Tensor]: ...

    def cache_dtype(self, tokenizer: nn.Module) -> torch.dtype: ...


def extract_tokens(
    tokenizer: TokenEncoder, dataset: DataSource, path: str | Path, batch_size: int = TOKEN_BATCH_SIZE,
    device: torch.device | str = "cpu", context: DistributedContext | None = None, shard_size: int = CACHE_SHARD_SIZE,
    num_workers: int = 0, *, head: TokenTargets,
) -> Path:
    """Tokenize every image and its mirror once into the sharded cache `path` (the token head's targets, as its
    `cache_dtype`: VAR's integer ids in int16 when the vocabulary fits), split over the ranks of `context` (see
    `build_cache`); a cache of other data or of another tokenizer is refused."""
    storage = head.cache_dtype(tokenizer)
    tokenizer = tokenizer.to(device).eval()

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": torch.cat(head.targets(tokenizer, images), dim=1).to(storage)}  # (2B, L, ...)

    return build_cache(dataset, encode, path, batch_size, device, "extracting tokens", cache_source(dataset, tokenizer),
                       context, shard_size, num_workers)
