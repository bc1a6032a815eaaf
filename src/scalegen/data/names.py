"""The data sources' names and defaults, free of torch, so that the command line's parsers show them without loading
the data code (scalegen.data and scalegen.shards import torch)."""
from __future__ import annotations

FASHION_MNIST_NAME = "fashion-mnist"  # the embedded default data set (`--data fashion-mnist`)
DEFAULT_IMAGES_PER_SHARD = 1000  # images in each tar shard `scalegen data pack` writes
