"""The Stable-Diffusion VAE (diffusers' AutoencoderKL) from a local path, as DiT's latent space."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scalegen.errors import UserError

LATENT_SCALE = 0.18215  # Stable Diffusion's latent scaling factor, used by DiT
LATENT_DOWNSAMPLE = 8
LATENT_CHANNELS = 4


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
    try:
        if path.is_dir():
            autoencoder = AutoencoderKL.from_pretrained(path, local_files_only=True)
        else:
            autoencoder = AutoencoderKL.from_single_file(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # no config, other weights, a broken file
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} holds no diffusers AutoencoderKL ({first}); pass --vae FOLDER of one (e.g. a local "
                        "copy of stabilityai/sd-vae-ft-ema) or --vae none for pixel space") from None
    return LatentCodec(autoencoder)
