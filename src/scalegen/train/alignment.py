"""VA-VAE's vision-foundation alignment (Yao et al. 2025, the tokenizer of LightningDiT): a KL tokenizer's latents,
projected by a 1×1 convolution to a frozen encoder's feature size, are pulled towards that encoder's feature map of
the same image by two margin losses:

- margin cosine similarity: mean over positions of relu(1 − m₁ − cos(projected, feature)), m₁ = 0.5;
- margin distance-matrix similarity: within each image, the cosine similarities between every two positions of the
  projected latents and of the features; mean of relu(|difference| − m₂), m₂ = 0.25.

Their sum is weighted adaptively, as VQGAN weights its GAN loss: by ‖∇L_rec‖ / ‖∇L_align‖ at the encoder's last
convolution, times a hyper-weight. The encoder is a local file of ours (a REPA encoder, `train classifier --export`),
never the classifier that scores FID (`load_patch_encoder` refuses it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalegen.train.repa import PatchEncoder, token_grid_features
from scalegen.train.task_options import COSINE_MARGIN, DISTANCE_MARGIN



def margin_cosine_loss(projected: torch.Tensor, features: torch.Tensor, margin: float = COSINE_MARGIN) -> torch.Tensor:
    """mean relu(1 − margin − cos) over examples and positions: projected latents and features (B, T, D) -> ()."""
    similarity = F.cosine_similarity(projected, features, dim=-1)  # (B, T)
    return F.relu(1.0 - margin - similarity).mean()


def self_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every two positions of each example: (B, T, D) -> (B, T, T)."""
    unit = F.normalize(tokens, dim=-1)  # (B, T, D)
    return unit @ unit.transpose(1, 2)  # (B, T, T)


def margin_distance_loss(projected: torch.Tensor, features: torch.Tensor,
                         margin: float = DISTANCE_MARGIN) -> torch.Tensor:
    """mean relu(|S(projected) − S(features)| − margin) of the self-similarity matrices S: (B, T, D) each -> ()."""
    difference = (self_similarity(projected) - self_similarity(features)).abs()  # (B, T, T)
    return F.relu(difference - margin).mean()


class FoundationAlignment(nn.Module):
    """The projection (trained with the tokenizer) and the frozen encoder of VA-VAE's alignment loss."""

    def __init__(self, latent_channels: int, encoder: PatchEncoder, cosine_margin: float = COSINE_MARGIN,
                 distance_margin: float = DISTANCE_MARGIN):
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Conv2d(latent_channels, encoder.feature_dim, kernel_size=1)
        self.cosine_margin, self.distance_margin = cosine_margin, distance_margin

    def forward(self, latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, c, h, w) of `images` (B, C, H, W) in [-1, 1] -> (margin cosine, margin distance) losses, ()."""
        features = token_grid_features(self.encoder(images).float(), latents.shape[-1])  # (B, h·w, D)
        projected = self.projection(latents.float()).flatten(2).transpose(1, 2)  # (B, h·w, D)
        return (margin_cosine_loss(projected, features, self.cosine_margin),
                margin_distance_loss(projected, features, self.distance_margin))
