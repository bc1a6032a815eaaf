"""The data wing's names and defaults, free of torch, so that the command line's parsers show them without loading
the data code: the forms a data source's items take, the built-in kinds of data source in words, and the size of the
tar shards `scalegen data pack` writes."""
from __future__ import annotations

from typing import Literal

Form = Literal["images", "latents", "tokens"]
IMAGES: Form = "images"  # pixels (C, H, W) in [-1, 1]
LATENTS: Form = "latents"  # a latent cache's samples (C_latent, h, w), with the images beside them for REPA
TOKENS: Form = "tokens"  # a token cache's ids (L,) over all scales
DEFAULT_IMAGES_PER_SHARD = 1000  # images in each tar shard `scalegen data pack` writes
# The built-in kinds of data source in words, by the name `scalegen.data.registry` gives each, in the order it tries
# them (the class folder, which takes any other string, last): their one place, which the registry's kinds carry and
# `--data`'s help lists without importing the readers (torch).
SOURCE_DESCRIPTIONS = {
    "fashion-mnist": "fashion-mnist (the embedded data set)",
    "tar-shards": "tar shards (a brace pattern such as train-{000000..000146}.tar, one .tar, or the .json index of "
                  "`scalegen data pack`)",
    "fashion-mnist-folder": "a folder of Fashion-MNIST's IDX files",
    "class-folder": "an image folder (one sub-folder per class)",
}
