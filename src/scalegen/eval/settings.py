"""Settings of the evaluation commands (`eval`, `reconstruct`) and the shape of the Fashion-MNIST classifier
(`train classifier`) that their parsers show, free of torch (the evaluation code imports it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scalegen.classes import FASHION_MNIST_CLASSES

DEFAULT_BATCH_SIZE = 64  # ADM's evaluator batch size
FEATURE_NETWORKS = ("inception", "fmnist")
RECONSTRUCTION_BATCH_SIZE = 256
GRID_PAIRS = 64  # the grid shows the first pairs only: a full FID count would make it unreadably large
Features = Literal["fmnist"]  # the features `scalegen reconstruct` can add rFID in


@dataclass
class ClassifierConfig:
    """Shape of the CNN (stored in the weights' JSON card so the network can be rebuilt from it)."""

    width: int = 32  # channels of the first stage; twice that in the other two
    feature_dim: int = 128  # penultimate layer: the FID features
    num_classes: int = len(FASHION_MNIST_CLASSES)
