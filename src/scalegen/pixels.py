"""The two ranges images take in scalegen: uint8 [0, 255] as read from disk, the networks' [-1, 1], and the [0, 1]
every sampling call returns. Its own module so that the models' sampling code converts without importing the data
readers."""
from __future__ import annotations

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in the networks' [-1, 1] -> float in [0, 1], the range scalegen's sampling calls return (clamped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)
