"""The data wing: what training reads and how.

- `names`: torch-free names and defaults (the forms a source's items take, the tar shards' size), for `--help`.
- `batch`: `Batch`, the one batch type the trainer and the tasks see, and `collate`, which makes one of items.
- `source`: the `DataSource` protocol every source follows (class folders, tar shards, Fashion-MNIST, a cache),
  `Subset` and `limited` (`--max-images`).
- `fashion_mnist`, `folder`, `shards`: the image sources (IDX files, class folders, WebDataset-style tar shards).
- `registry`: `register_source` and `open_source`, which recognises a `--data` string and opens its source.
- `sampling`: the trainer's resumable samplers (whole tar shards per rank) and `OnDevice` (`--data-on-device`).
- `store`, `caches`: the sharded, memory-mapped cache store and the latent and token caches over it.
"""
