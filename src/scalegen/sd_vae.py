"""The Stable-Diffusion VAE (diffusers' AutoencoderKL) from a local path, and a one-time latent cache.

The cache stores the posterior mean and standard deviation of every image and of its mirror image, so training
still draws a fresh latent sample each time (as on-the-fly encoding does) and keeps the random flip.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from scalegen.data import cache_with_mirrors
from scalegen.errors import UserError
from scalegen.tokenizer_codec import TokenizerCodec

LATENT_SCALE = 0.18215  # Stable Diffusion's latent scaling factor, used by DiT
LATENT_DOWNSAMPLE = 8


class LatentCodec(nn.Module):
    """Pixels <-> scaled latents through an SD VAE. Frozen: only ever used under no_grad."""

    guide_all_channels = False  # the official DiT guides only the first three of the four latent channels

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> scaled posterior mean and std, each (B, 4, H/8, W/8)."""
        posterior = self.autoencoder.encode(images).latent_dist
        return posterior.mean * LATENT_SCALE, posterior.std * LATENT_SCALE

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> one latent sample, scaled (B, 4, H/8, W/8)."""
        mean, std = self.encode_distribution(images)
        return mean + std * torch.randn_like(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (not clamped)."""
        return self.autoencoder.decode(latents / LATENT_SCALE).sample


def load_sd_vae(path: str | Path) -> LatentCodec:
    """Load an AutoencoderKL from a local diffusers folder (config.json + weights) or a single weights file.

    Nothing is downloaded: a path that is not on disk is an error.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("--vae needs the diffusers package: pip install 'scalegen[vae]'") from None
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"VAE {path} not found; pass --vae FOLDER holding a diffusers AutoencoderKL "
            "(e.g. a local copy of stabilityai/sd-vae-ft-ema) or --vae none for pixel space"
        )
    if path.is_dir():
        autoencoder = AutoencoderKL.from_pretrained(path, local_files_only=True)
    else:
        autoencoder = AutoencoderKL.from_single_file(path, local_files_only=True)
    return LatentCodec(autoencoder)


class LatentCache(Dataset):
    """Cached latents addressed by (index, flip), as the image datasets; yields a fresh sample each time."""

    def __init__(self, path: str | Path):
        tensors = load_file(Path(path))
        self.mean, self.std, self.labels = tensors["mean"], tensors["std"], tensors["labels"]  # (N, 2, C_latent, h, w) ×2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        mean, std = self.mean[index, int(flip)].float(), self.std[index, int(flip)].float()  # (C_latent, h, w)
        return {"latent": mean + std * torch.randn_like(mean), "label": self.labels[index]}


def extract_latents(
    codec: LatentCodec | TokenizerCodec, dataset: Dataset, path: str | Path, batch_size: int = 32, device: torch.device | str = "cpu"
) -> Path:
    """Encode every image and its mirror once into a safetensors cache at `path` (fp16 mean and std)."""
    codec = codec.to(device)

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, std = codec.encode_distribution(images)  # (2B, C_latent, h, w) ×2
        return {"mean": mean.half(), "std": std.half()}

    return cache_with_mirrors(dataset, encode, path, batch_size, device, "extracting latents")
