"""Reading REPA's images beside a latent cache made from tar shards (a benchmark, not a test): the items of an epoch's
order read through the cached path (`LatentCache` with its images, as a `--latent-cache --repa-encoder` run on shards
reads them), in a global permutation of the cache (the trainer's order before the cache had `shard_sizes`) against the
shard-aware order the trainer now deals it (`data.sampling.epoch_sampler` -> `ShardSampler`), with the images alone
through the uncached path for reference. Prints items/s and tar shards opened per 1,000 items, best of the rounds.

    .venv/bin/python bench/cache_locality.py [--work /tmp/cache_locality] [--shards 300] [--per-shard 20]

The images are synthetic JPEGs; the cache's "latents" are 8×8 average pools of them (the encoder's cost is not what
is measured). A process keeps OPEN_SHARDS tar shards open; reopening one re-indexes its members (wids).
"""
from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scalegen.data import shards as shard_module
from scalegen.data.caches import LatentCache
from scalegen.data.sampling import ResumableSampler, epoch_sampler
from scalegen.data.shards import TarShards, pack_folder
from scalegen.data.shards import OPEN_SHARDS
from scalegen.data.store import build_cache

CLASSES = 10
BATCH_SIZE = 32  # one rank's micro-batch: what the samplers deal in
POOL = 8  # the stand-in encoder's downsampling


def write_images(folder: Path, count: int, image_size: int) -> None:
    """`count` smooth random JPEGs in CLASSES class folders (skipped when the folder already holds them)."""
    if folder.exists() and sum(1 for _ in folder.rglob("*.jpg")) == count:
        return
    generator = np.random.default_rng(0)
    for number in range(count):
        (folder / f"class-{number % CLASSES}").mkdir(parents=True, exist_ok=True)
        coarse = generator.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((image_size, image_size), Image.BICUBIC)
        image.save(folder / f"class-{number % CLASSES}" / f"{number:06d}.jpg", quality=90)


def pooled(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stand-in encoder: (2B, 3, S, S) -> fp16 "mean" and "std" (2B, 3, S/8, S/8)."""
    mean = torch.nn.functional.avg_pool2d(images, POOL).half()
    return {"mean": mean, "std": torch.zeros_like(mean)}


def timed_reads(dataset, sampler, items: int) -> tuple[float, float]:
    """Items/s and shards opened per 1,000 items, reading the first `items` of the sampler's order one by one."""
    opened = []
    real_open_shard = shard_module.open_shard
    shard_module.open_shard = lambda path: opened.append(path) or real_open_shard(path)
    try:
        started = time.perf_counter()
        for item in islice(iter(sampler), items):
            dataset[item]
        seconds = time.perf_counter() - started
    finally:
        shard_module.open_shard = real_open_shard
    return items / seconds, 1000 * len(opened) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cache_locality"))
    parser.add_argument("--shards", type=int, default=300)
    parser.add_argument("--per-shard", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--items", type=int, default=2000, help="items read per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    write_images(args.work / "images", args.shards * args.per_shard, args.image_size)
    index = args.work / "shards" / "train.json"
    if not index.exists():
        pack_folder(args.work / "images", index.with_suffix(""), args.per_shard)
    images = TarShards(index, args.image_size)
    cache = build_cache(images, pooled, args.work / "latents", 64, "cpu", "pooling", {"data": images.identity()})

    def cached():
        return LatentCache(cache, images=TarShards(index, args.image_size))  # fresh: no shard open yet

    readers = {
        "cached, global permutation (before)": lambda: (dataset := cached(),
                                                        ResumableSampler(len(dataset), BATCH_SIZE, seed=1)),
        "cached, shard-aware (after)": lambda: (dataset := cached(), epoch_sampler(dataset, BATCH_SIZE, seed=1)),
        "uncached images (reference)": lambda: (dataset := TarShards(index, args.image_size),
                                                epoch_sampler(dataset, BATCH_SIZE, seed=1)),
    }
    best = {name: (0.0, 0.0) for name in readers}
    for _ in range(args.rounds):  # interleaved, so that a busy moment of the machine hits each alike
        for name, reader in readers.items():
            speed, opens = timed_reads(*reader(), args.items)
            best[name] = max(best[name], (speed, opens))
    print(f"{args.shards} shards of {args.per_shard} {args.image_size}px JPEGs, {OPEN_SHARDS} kept open; "
          f"{args.items} items read, best of {args.rounds}")
    print(f"{'path':40s} {'items/s':>9s} {'opens/1000 items':>17s}")
    for name, (speed, opens) in best.items():
        print(f"{name:40s} {speed:9.1f} {opens:17.1f}")


if __name__ == "__main__":
    main()
