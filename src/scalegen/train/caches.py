"""One-time caches of a data set in a latent space, addressed by (index, flip) like the image data sets.

The latent cache (DiT) stores the posterior mean and standard deviation of every image and of its mirror image, so
training still draws a fresh latent sample each time (as on-the-fly encoding does) and keeps the random flip. The
token cache (VAR) stores every image's and mirror's tokens over all scales.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from scalegen.data import cache_with_mirrors
from scalegen.tokenizers.codec import TokenizerCodec
from scalegen.tokenizers.sd_vae import LatentCodec
from scalegen.tokenizers.vqvae import VQVAE
from scalegen.train.loading import OnDevice

LATENT_BATCH_SIZE = 32
TOKEN_BATCH_SIZE = 64


class LatentCache(Dataset):
    """Cached latents addressed by (index, flip), as the image datasets; yields a fresh sample each time, and the
    image itself too when the data set it was made from is given (REPA's encoder needs it)."""

    def __init__(self, path: str | Path, images: Dataset | None = None):
        tensors = load_file(Path(path))
        self.mean, self.std, self.labels = tensors["mean"], tensors["std"], tensors["labels"]  # (N, 2, C_latent, h, w) ×2
        self.images = images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        mean, std = self.mean[index, int(flip)].float(), self.std[index, int(flip)].float()  # (C_latent, h, w)
        item_data = {"latent": mean + std * torch.randn_like(mean), "label": self.labels[index]}
        if self.images is not None:
            item_data["image"] = self.images[item]["image"]  # (C, H, W)
        return item_data

    def to(self, device: torch.device) -> LatentCache:
        """Hold the cache (and the images beside it) on `device` (for `OnDevice`)."""
        self.mean, self.std, self.labels = self.mean.to(device), self.std.to(device), self.labels.to(device)
        if self.images is not None:
            self.images = OnDevice(self.images, device)
        return self

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> dict:
        """The items (indices[i], flips[i]) as one batch, a fresh latent sample each (`OnDevice`)."""
        flips = flips.long()
        mean, std = self.mean[indices, flips].float(), self.std[indices, flips].float()  # (B, C_latent, h, w)
        batch = {"latent": mean + std * torch.randn_like(mean), "label": self.labels[indices]}
        if self.images is not None:
            batch["image"] = self.images.dataset.batch(indices, flips.bool())["image"]  # (B, C, H, W)
        return batch


def extract_latents(
    codec: LatentCodec | TokenizerCodec, dataset: Dataset, path: str | Path, batch_size: int = LATENT_BATCH_SIZE,
    device: torch.device | str = "cpu",
) -> Path:
    """Encode every image and its mirror once into a safetensors cache at `path` (fp16 mean and std)."""
    codec = codec.to(device)

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, std = codec.encode_distribution(images)  # (2B, C_latent, h, w) ×2
        return {"mean": mean.half(), "std": std.half()}

    return cache_with_mirrors(dataset, encode, path, batch_size, device, "extracting latents")


class TokenCache(Dataset):
    """Pre-extracted tokens of every image and its mirror, addressed by (index, flip) like the image datasets."""

    def __init__(self, path: str | Path):
        tensors = load_file(Path(path))
        self.tokens, self.labels = tensors["tokens"], tensors["labels"]  # (N, 2, L), (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        return {"tokens": self.tokens[index, int(flip)].long(), "label": self.labels[index]}

    def to(self, device: torch.device) -> TokenCache:
        """Hold the tokens on `device` (for `OnDevice`)."""
        self.tokens, self.labels = self.tokens.to(device), self.labels.to(device)
        return self

    def batch(self, indices: torch.Tensor, flips: torch.Tensor) -> dict:
        """The items (indices[i], flips[i]) as one batch (`OnDevice`)."""
        return {"tokens": self.tokens[indices, flips.long()].long(), "label": self.labels[indices]}


def extract_tokens(tokenizer: VQVAE, dataset: Dataset, path: str | Path, batch_size: int = TOKEN_BATCH_SIZE,
                   device: torch.device | str = "cpu") -> Path:
    """Tokenize every image and its mirror once into a safetensors cache at `path` (int16 when the vocabulary fits)."""
    storage = torch.int16 if tokenizer.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
    tokenizer = tokenizer.to(device).eval()

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": torch.cat(tokenizer.img_to_tokens(images), dim=1).to(storage)}  # (2B, L)

    return cache_with_mirrors(dataset, encode, path, batch_size, device, "extracting tokens")
