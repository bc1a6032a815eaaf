"""A latent cache read beside the tar shards it was made from (REPA's images) keeps their locality: the trainer's
sampler deals it whole shards as it deals the shards themselves, so a rank opens each of its shards once an epoch
instead of one per image, while an epoch still covers every item once and resumes bit for bit."""
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.data import shards as shard_module
from scalegen.data.caches import LatentCache
from scalegen.data.sampling import ResumableSampler, ShardSampler, epoch_sampler
from scalegen.data.shards import TarShards, pack_folder
from scalegen.data.shards import OPEN_SHARDS
from scalegen.data.store import build_cache

IMAGE_SIZE = 8
SHARD_COUNT = 60  # many more than the OPEN_SHARDS a process keeps open: reads at random reopen shards all the time
PER_SHARD = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """60 shards of 2 images, one of them unreadable (the cache skips it: its shard has one item there)."""
    root = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    for number in range(SHARD_COUNT * PER_SHARD - 1):
        (root / f"class-{number % 3}").mkdir(exist_ok=True)
        path = root / f"class-{number % 3}" / f"{number:03d}.png"
        Image.fromarray(generator.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(path)
    (root / "class-0" / "broken.png").write_bytes(b"not a png")
    return pack_folder(root, tmp_path_factory.mktemp("shards") / "train", PER_SHARD)


def pooled(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stand-in encoder: 2×2 average pools of the images (2B, 3, 8, 8) -> (2B, 3, 4, 4)."""
    mean = torch.nn.functional.avg_pool2d(images, 2).half()
    return {"mean": mean, "std": torch.zeros_like(mean)}


@pytest.fixture(scope="module")
def cache(shards, tmp_path_factory) -> Path:
    images = TarShards(shards, IMAGE_SIZE)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        return build_cache(images, pooled, tmp_path_factory.mktemp("cache") / "latents", 8, "cpu", "pooling",
                           {"data": images.identity()}, shard_size=16)


def test_the_cache_has_its_items_by_source_shard(shards, cache):
    latents = LatentCache(cache, images=TarShards(shards, IMAGE_SIZE))
    sources = latents.arrays.column("indices").tolist()
    (broken,) = set(range(SHARD_COUNT * PER_SHARD)) - set(sources)
    expected = [PER_SHARD] * SHARD_COUNT
    expected[broken // PER_SHARD] -= 1
    assert latents.shard_sizes == expected and sum(expected) == len(latents)
    sampler = epoch_sampler(latents, 4)
    assert isinstance(sampler, ShardSampler)
    for shard, (start, size) in enumerate(zip(sampler.shard_starts, sampler.shard_sizes)):
        assert {source // PER_SHARD for source in sources[start : start + size]} <= {shard}
    assert type(epoch_sampler(LatentCache(cache), 4)) is ResumableSampler  # no images to read: any order is cheap


def count_opens(monkeypatch) -> list[Path]:
    opened = []
    real_open_shard = shard_module.open_shard
    monkeypatch.setattr(shard_module, "open_shard", lambda path: opened.append(path) or real_open_shard(path))
    return opened


@pytest.mark.parametrize("world_size", [1, 2])
def test_reading_the_cache_with_its_images_opens_each_shard_once_an_epoch(shards, cache, monkeypatch, world_size):
    opened = count_opens(monkeypatch)
    for rank in range(world_size):  # each rank a process of its own: its own open shards
        latents = LatentCache(cache, images=TarShards(shards, IMAGE_SIZE))
        sampler = epoch_sampler(latents, 3, rank, world_size, seed=5)
        for epoch in range(2):
            opened.clear()
            items = sampler.epoch_items(epoch)
            for item in items:
                assert latents[item]["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert len(opened) <= SHARD_COUNT // world_size, (rank, epoch)  # each of its shards once at most
            assert len(opened) > OPEN_SHARDS


def test_an_epoch_of_the_cache_is_every_item_once_and_resumes_bit_for_bit(shards, cache):
    latents = LatentCache(cache, images=TarShards(shards, IMAGE_SIZE))
    batch = 7  # 119 items: an epoch is every one of them
    for epoch in range(3):
        order = epoch_sampler(latents, batch, seed=2).epoch_items(epoch)
        assert sorted(index for index, _ in order) == list(range(len(latents)))
    ranks = [epoch_sampler(latents, 2, rank, 2, seed=2).epoch_items(0) for rank in range(2)]
    assert not {index for index, _ in ranks[0]} & {index for index, _ in ranks[1]}
    straight = list(islice(iter(epoch_sampler(latents, batch, seed=2)), 3 * len(latents)))
    resumed = epoch_sampler(latents, batch, seed=2)
    resumed.start_batch = 23  # mid-epoch 2 (17 batches an epoch)
    assert list(islice(iter(resumed), len(straight) - 23 * batch)) == straight[23 * batch :]
