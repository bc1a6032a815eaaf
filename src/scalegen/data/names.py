"""The data wing's names and defaults, free of torch, so that the command line's parsers show them without loading
the data code: the forms a data source's items take, and the size of the tar shards `scalegen data pack` writes."""
from __future__ import annotations

from typing import Literal

Form = Literal["images", "latents", "tokens"]
IMAGES: Form = "images"  # pixels (C, H, W) in [-1, 1]
LATENTS: Form = "latents"  # a latent cache's samples (C_latent, h, w), with the images beside them for REPA
TOKENS: Form = "tokens"  # a token cache's ids (L,) over all scales
DEFAULT_IMAGES_PER_SHARD = 1000  # images in each tar shard `scalegen data pack` writes
