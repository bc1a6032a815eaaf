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
    """Pixels <-> scaled latents through a diffusers AutoencoderKL. Frozen: only ever used under no_grad.

    The scaling is the autoencoder config's: per-channel `latents_mean` / `latents_std` when it has them (a KL
    tokenizer of ours exported by `scalegen export`), else (latent − shift_factor) · scaling_factor (SD: 0.18215).
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        settings = autoencoder.config
        if settings.get("latents_mean") is not None:
            shift = torch.tensor(settings["latents_mean"]).reshape(1, -1, 1, 1)  # (1, c, 1, 1)
            scale = 1.0 / torch.tensor(settings["latents_std"]).reshape(1, -1, 1, 1)  # (1, c, 1, 1)
        else:
            shift = torch.tensor(float(settings.get("shift_factor") or 0.0))
            scale = torch.tensor(float(settings.get("scaling_factor", LATENT_SCALE)))
        self.register_buffer("shift", shift.float())
        self.register_buffer("scale", scale.float())
        # The official DiT guides only the first three of SD's four latent channels; other latents guide all.
        self.guide_all_channels = not (settings.get("latent_channels") == LATENT_CHANNELS
                                       and settings.get("latents_mean") is None
                                       and float(settings.get("scaling_factor", 0.0)) == LATENT_SCALE)

    @property
    def latent_network(self) -> nn.Module:
        """The network whose weights decide the latents (a latent cache records their digest): the codec whole, its
        scale being the VAE config's."""
        return self

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config["latent_channels"]

    @property
    def downsample_ratio(self) -> int:
        """Image side / latent side: every encoder level but the last halves it (SD's VAE: 8)."""
        return 2 ** (len(self.autoencoder.config["block_out_channels"]) - 1)

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> scaled posterior mean and std, each (B, c, H/f, W/f)."""
        posterior = self.autoencoder.encode(images).latent_dist
        return (posterior.mean - self.shift) * self.scale, posterior.std * self.scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> one latent sample, scaled (B, 4, H/8, W/8)."""
        mean, std = self.encode_distribution(images)
        return mean + std * torch.randn_like(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> images (B, C, fh, fw) in [-1, 1] (not clamped)."""
        return self.autoencoder.decode(latents / self.scale + self.shift).sample


def load_sd_vae(path: str | Path) -> LatentCodec:
    """Load an AutoencoderKL from a local diffusers folder (config.json + weights) or a single weights file.

    Nothing is downloaded: a path that is not on disk is an error.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("--vae needs the diffusers package (a dependency of scalegen): pip install diffusers") from None
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
