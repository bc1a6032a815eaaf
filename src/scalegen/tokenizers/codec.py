"""Latent spaces of our own for DiT: a tokenizer of ours (`train vqvae` or `train kl`) and how its latents are scaled.

- A VQ tokenizer: the DiT generates its quantized features f̂ (B, z_channels, h, w) — the same multi-scale sum of
  codebook vectors that VAR builds token by token — divided by their spread over the data (as SD latents are
  multiplied by 0.18215), so the diffusion sees unit-variance latents.
- A KL tokenizer: the DiT generates its latents normalised per channel, (latents − mean) / std over the data (or by
  REPA-E's batch-norm statistics when the tokenizer was tuned end to end).

`tokenizer_codec` builds the codec of either from a DiT's stored "tokenizer" description.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from scalegen.data import unflipped_loader
from scalegen.tokenizers.kl_vae import KLVAE, LatentNormalization
from scalegen.tokenizers.vqvae import VQVAE

SCALE_IMAGES = 2048  # images whose features set the latent scale
SCALE_BATCH_SIZE = 256


class TokenizerCodec(nn.Module):
    """Pixels <-> scaled quantized features of a frozen tokenizer; only ever used under no_grad."""

    guide_all_channels = True  # every latent channel is ours: guidance applies to all of them

    def __init__(self, tokenizer: VQVAE, latent_scale: float):
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.latent_scale = latent_scale

    @property
    def latent_channels(self) -> int:
        return self.tokenizer.z_channels

    @property
    def latent_size(self) -> int:
        return self.tokenizer.patch_nums[-1]

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> scaled f̂ and a zero std (the quantizer is deterministic), each (B, z, h, w)."""
        features = self.tokenizer.img_to_features(images)  # (B, z, h, w)
        f_hat = self.tokenizer.quantize(features).f_hat * self.latent_scale  # (B, z, h, w)
        return f_hat, torch.zeros_like(f_hat)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled f̂ (B, z, h, w)."""
        return self.encode_distribution(images)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled f̂ (B, z, h, w) -> images (B, C, H, W) in [-1, 1]."""
        return self.tokenizer.features_to_img(latents / self.latent_scale)


class KLCodec(nn.Module):
    """Pixels <-> normalised latents of a KL tokenizer. Frozen (an end-to-end run unfreezes its tokenizer)."""

    guide_all_channels = True  # every latent channel is ours: guidance applies to all of them

    def __init__(self, tokenizer: KLVAE, normalization: LatentNormalization):
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.normalization = normalization

    @property
    def latent_channels(self) -> int:
        return self.tokenizer.config.latent_channels

    @property
    def latent_size(self) -> int:
        return self.tokenizer.config.latent_size

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> normalised posterior mean and std, each (B, c, h, w)."""
        mean, logvar = self.tokenizer.encode_moments(images)  # (B, c, h, w) each
        return self.normalization(mean), torch.exp(0.5 * logvar) * self.normalization.scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> one normalised latent sample (B, c, h, w)."""
        mean, std = self.encode_distribution(images)  # (B, c, h, w) each
        return mean + std * torch.randn_like(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1] (not clamped)."""
        return self.tokenizer.decode(self.normalization.inverse(latents))


def tokenizer_codec(tokenizer: VQVAE | KLVAE, description: dict) -> TokenizerCodec | KLCodec:
    """The codec of a DiT's tokenizer from its stored description ("latent_scale"; for a KL tokenizer also
    "latent_shift", per channel)."""
    if isinstance(tokenizer, KLVAE):
        return KLCodec(tokenizer, LatentNormalization.from_description(description))
    return TokenizerCodec(tokenizer, description["latent_scale"])


@torch.no_grad()
def measure_normalization(tokenizer: VQVAE | KLVAE, dataset: Dataset, device: torch.device | str = "cpu",
                          count: int = SCALE_IMAGES) -> dict:
    """How a DiT should scale the tokenizer's latents, measured over the first `count` images of `dataset`: the
    description `tokenizer_codec` reads ({"latent_scale"} for a VQ tokenizer; per-channel {"latent_shift",
    "latent_scale"} of the latent samples for a KL one)."""
    if not isinstance(tokenizer, KLVAE):
        return {"latent_scale": measure_latent_scale(tokenizer, dataset, device, count)}
    latents = encoded(KLCodec(tokenizer.to(device), LatentNormalization([0.0], [1.0])), dataset, device, count)
    channels = latents.transpose(0, 1).flatten(1)  # (c, N·h·w)
    return LatentNormalization(channels.mean(dim=1), 1.0 / channels.std(dim=1)).description()


@torch.no_grad()
def measure_latent_scale(tokenizer: VQVAE, dataset: Dataset, device: torch.device | str = "cpu",
                         count: int = SCALE_IMAGES) -> float:
    """1 / standard deviation of the tokenizer's f̂ over the first `count` images of `dataset`."""
    return 1.0 / encoded(TokenizerCodec(tokenizer.to(device), 1.0), dataset, device, count).std().item()


def encoded(codec: TokenizerCodec | KLCodec, dataset: Dataset, device: torch.device | str, count: int) -> torch.Tensor:
    """The codec's latents of the first `count` images of `dataset`, unflipped: (N, c, h, w)."""
    loader = unflipped_loader(dataset, SCALE_BATCH_SIZE, count)
    return torch.cat([codec.encode(batch["image"].to(device)) for batch in loader if "image" in batch])  # (N, c, h, w)
