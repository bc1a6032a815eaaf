"""The axes and panels of training-curve figures (`train.curves.plot_curves`), free of torch, so that `scalegen plot`'s
parser offers them without loading the log readers."""
from __future__ import annotations

from typing import Literal

XAxis = Literal["step", "images"]
PanelBy = Literal["metric", "run"]
STEP = "step"
