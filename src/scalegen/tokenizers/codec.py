"""A small latent space of our own for DiT: the quantized features f̂ of a `train vqvae` tokenizer.

A DiT trained here generates f̂ (B, z_channels, h, w) — the same multi-scale sum of codebook vectors that VAR builds
token by token — and the tokenizer's decoder turns it into pixels. The features are divided by their spread over
the data (as SD latents are multiplied by 0.18215), so the diffusion sees unit-variance latents.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from scalegen.data import unflipped_loader
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


@torch.no_grad()
def measure_latent_scale(tokenizer: VQVAE, dataset: Dataset, device: torch.device | str = "cpu",
                         count: int = SCALE_IMAGES) -> float:
    """1 / standard deviation of the tokenizer's f̂ over the first `count` images of `dataset`."""
    codec = TokenizerCodec(tokenizer.to(device), 1.0)
    loader = unflipped_loader(dataset, SCALE_BATCH_SIZE, count)
    features = torch.cat([codec.encode(batch["image"].to(device)) for batch in loader if "image" in batch])  # (N, z, h, w)
    return 1.0 / features.std().item()
