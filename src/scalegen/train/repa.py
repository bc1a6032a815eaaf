"""REPA (Yu et al. 2024): align a DiT block's hidden tokens with a frozen encoder's patch features.

A projector MLP maps block K's tokens (B, T, D) to the encoder's feature size; the loss is one minus the cosine
similarity with the encoder's feature map of the clean image, resized to the DiT's token grid, averaged over tokens
(REPA's negative similarity plus one: the same gradients, and zero for perfectly aligned features).
The projector trains with the DiT and is saved with the run (in its training state); sampling never needs it.

The encoder is a Fashion-MNIST CNN of ours (`scalegen train classifier --export FILE`), its convolutional feature
map before pooling; the shipped classifier itself is refused, so `eval --features fmnist` stays independent of the
training signal.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scalegen.errors import UserError
from scalegen.eval.fmnist import SHIPPED_WEIGHTS, FashionClassifier, load_classifier

PROJECTOR_WIDTH_FACTOR = 4  # the projector's hidden width: 4× the DiT's (REPA: 2048 for widths 384–1152)


class PatchEncoder(nn.Module):
    """A frozen classifier's convolutional feature map: images (B, 1, 32, 32) in [-1, 1] -> (B, C, h, w)."""

    def __init__(self, classifier: FashionClassifier):
        super().__init__()
        self.stages = classifier.stages
        self.requires_grad_(False).eval()

    @property
    def feature_dim(self) -> int:
        return self.stages[-1][0].out_channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)  # (B, C, h, w)


def load_patch_encoder(path: str | Path) -> PatchEncoder:
    """The REPA encoder exported by `scalegen train classifier --export FILE.safetensors` (its JSON card beside it)."""
    if Path(path).resolve() == SHIPPED_WEIGHTS.resolve():
        raise UserError("the shipped classifier judges `eval --features fmnist`, so it cannot also train the model; "
                        "train an encoder with `scalegen train classifier --export FILE.safetensors` and pass that")
    classifier, _, _ = load_classifier(path)
    return PatchEncoder(classifier)


def projector(hidden_size: int, feature_dim: int, width: int | None = None) -> nn.Sequential:
    """REPA's projector: Linear, SiLU, Linear, SiLU, Linear from the DiT width to the encoder's feature size."""
    width = width or PROJECTOR_WIDTH_FACTOR * hidden_size
    return nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, feature_dim))


def token_grid_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """An encoder feature map (B, C, h, w) resized to the DiT's grid × grid tokens -> (B, grid², C)."""
    if features.shape[-1] != grid:
        features = F.interpolate(features, size=(grid, grid), mode="bilinear", antialias=True)  # (B, C, g, g)
    return features.flatten(2).transpose(1, 2)  # (B, g², C)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One minus the mean cosine similarity per example: projected tokens and target features (B, T, C) -> (B,)."""
    similarity = F.cosine_similarity(projected, target, dim=-1)  # (B, T)
    return 1 - similarity.mean(dim=1)  # (B,)


class BlockTap:
    """Keeps the output tokens (B, T, D) of one DiT block from the last forward pass (a forward hook: the model
    code is untouched)."""

    def __init__(self, block: nn.Module):
        self.tokens: torch.Tensor | None = None
        block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.tokens = output

    def take(self) -> torch.Tensor:
        """The kept tokens, once: a second call without a forward pass in between is an error."""
        if self.tokens is None:
            raise RuntimeError("the REPA block was not run since the last loss")
        tokens, self.tokens = self.tokens, None
        return tokens
