"""Settings of `scalegen reconstruct` that its parser shows, free of torch (the reconstruction code imports it)."""
from __future__ import annotations

from typing import Literal

RECONSTRUCTION_BATCH_SIZE = 256
GRID_PAIRS = 64  # the grid shows the first pairs only: a full FID count would make it unreadably large
Features = Literal["fmnist"]  # the features `scalegen reconstruct` can add rFID in
