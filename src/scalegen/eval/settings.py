"""Settings of the evaluation commands (`eval`, `reconstruct`) that their parsers show, free of torch (the evaluation
code imports it)."""
from __future__ import annotations

from typing import Literal

DEFAULT_BATCH_SIZE = 64  # ADM's evaluator batch size
FEATURE_NETWORKS = ("inception", "fmnist")
RECONSTRUCTION_BATCH_SIZE = 256
GRID_PAIRS = 64  # the grid shows the first pairs only: a full FID count would make it unreadably large
Features = Literal["fmnist"]  # the features `scalegen reconstruct` can add rFID in
