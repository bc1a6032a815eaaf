"""The numeric precisions of training and sampling, by name, free of torch so that the command line's parsers list
them without loading it (`scalegen.mixed_precision` resolves a name for a device and autocasts)."""
from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
