"""Tar shards: the same items as the class folder they were packed from, disjoint shards per rank, exact resume."""
import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.cli.main import main
from scalegen.data.folder import ImageFolder
from scalegen.data.registry import open_source
from scalegen.data.sampling import ResumableSampler, ShardSampler, epoch_sampler
from scalegen.data.shards import TarShards, pack_folder
from scalegen.data.source import limited
from scalegen.errors import UserError
from scalegen.models.dit import DiTConfig
from scalegen.train.dit_task import DiTTask
from scalegen.train.run_log import read_log
from scalegen.train.trainer import TrainConfig, train

CLASSES = ("cat", "dog", "fox")
PER_CLASS = 8
IMAGE_SIZE = 8
PER_SHARD = 5  # 24 images: shards of 5, 5, 5, 5 and 4
SHARD_COUNT = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes × 8 random 12×12 images, PNG and JPEG (upper-case `.JPEG`, as ImageNet names them)."""
    root = tmp_path_factory.mktemp("folder")
    generator = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for number in range(PER_CLASS):
            pixels = generator.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{number}.{'png' if number % 2 else 'JPEG'}")
    return root


@pytest.fixture(scope="module")
def index(folder, tmp_path_factory) -> Path:
    return pack_folder(folder, tmp_path_factory.mktemp("shards") / "train", PER_SHARD, seed=0)


def contents(dataset) -> list[tuple[int, bytes]]:
    """The data set's items as sorted (label, image bytes) pairs: a multiset that ignores the order."""
    items = [dataset[(position, False)] for position in range(len(dataset))]
    return sorted((int(item["label"]), item["image"].numpy().tobytes()) for item in items)


def test_the_command_line_packs_the_same_bytes_as_the_library(folder, index, tmp_path, capsys):
    main(["data", "pack", str(folder), "--out", str(tmp_path / "train"), "--images-per-shard", str(PER_SHARD)])
    assert str(tmp_path / "train.json") in capsys.readouterr().out
    written = sorted(path.name for path in index.parent.iterdir())
    assert written == [f"train-{shard:06d}.tar" for shard in range(SHARD_COUNT)] + ["train.json"]
    for name in written:
        assert (tmp_path / name).read_bytes() == (index.parent / name).read_bytes()
    with tarfile.open(index.parent / "train-000000.tar") as tar:
        names = tar.getnames()
    assert Path(names[0]).stem == Path(names[1]).stem == "000000000" and names[1].endswith(".cls")
    assert {Path(name).suffix for name in names} <= {".jpg", ".png", ".cls"}


def test_shards_hold_the_folder_items_bit_for_bit(folder, index):
    described = open_source(str(index), IMAGE_SIZE)
    patterned = open_source(str(index.parent / "train-{000000..000004}.tar"), IMAGE_SIZE)
    assert isinstance(described, TarShards) and isinstance(patterned, TarShards)
    assert described.classes == list(CLASSES) and patterned.classes is None
    assert described.num_classes == patterned.num_classes == len(CLASSES)
    assert described.shard_sizes == patterned.shard_sizes == [5, 5, 5, 5, 4]
    for position in range(len(described)):
        for flip in (False, True):
            first, second = described[(position, flip)], patterned[(position, flip)]
            assert torch.equal(first["image"], second["image"]) and first["label"] == second["label"]
    assert torch.equal(described[(3, True)]["image"], described[(3, False)]["image"].flip(-1))
    assert contents(described) == contents(ImageFolder(folder, IMAGE_SIZE))
    assert limited(described, 12).shard_sizes == [5, 5, 2]


def test_ranks_read_disjoint_shards_that_cover_each_epoch(folder, index):
    dataset = TarShards(index, IMAGE_SIZE)
    assert isinstance(epoch_sampler(dataset, 2, 0, 2), ShardSampler)
    assert type(epoch_sampler(ImageFolder(folder, IMAGE_SIZE), 2, 0, 2)) is ResumableSampler  # declares no units
    shard_of = [shard for shard, size in enumerate(dataset.shard_sizes) for _ in range(size)]
    orders = []
    for epoch in range(3):
        ranks = [epoch_sampler(dataset, 2, rank, 2, seed=1).epoch_items(epoch) for rank in range(2)]
        shards = [{shard_of[position] for position, _ in items} for items in ranks]
        assert not shards[0] & shards[1]
        assert len(ranks[0]) == len(ranks[1]) == 8  # a rank surely gets the 4 + 5 images of two shards: 4 batches
        positions = [position for items in ranks for position, _ in items]
        assert len(set(positions)) == len(positions)
        # On one rank, an epoch is every item once, in a new order.
        alone = epoch_sampler(dataset, 4, seed=1).epoch_items(epoch)
        assert sorted(position for position, _ in alone) == list(range(len(dataset)))
        orders.append(alone)
    assert orders[0] != orders[1] != orders[2]
    assert epoch_sampler(dataset, 4, seed=1).epoch_items(1) == orders[1]  # the seed alone decides


def test_a_sampler_resumed_mid_epoch_yields_the_rest(index):
    dataset = TarShards(index, IMAGE_SIZE)
    straight = list(islice(iter(epoch_sampler(dataset, 2, 1, 2, seed=3)), 30))  # 8 items an epoch: into the 4th
    resumed = epoch_sampler(dataset, 2, 1, 2, seed=3)
    resumed.start_batch = 5
    assert list(islice(iter(resumed), 20)) == straight[10:]


def test_two_ranks_with_accumulation_resumed_mid_epoch_see_the_batches_of_an_uninterrupted_run(index):
    dataset = TarShards(index, IMAGE_SIZE)
    world_size, accumulation, batch_size = 2, 2, 8
    micro_batch = batch_size // (world_size * accumulation)  # as the trainer deals it: 2 items

    def steps(sampler: ShardSampler, count: int) -> list[list[list[tuple[int, bool]]]]:
        """`count` optimizer steps of the sampler: each `accumulation` micro-batches of `micro_batch` items."""
        items = iter(sampler)
        return [[[next(items) for _ in range(micro_batch)] for _ in range(accumulation)] for _ in range(count)]

    # A rank's smallest shards hold 4 + 5 items: 4 micro-batches, 2 steps an epoch; step 3 is mid-epoch, 8 crosses 3.
    straight = [steps(epoch_sampler(dataset, micro_batch, rank, world_size, seed=4), 8) for rank in range(world_size)]
    for rank in range(world_size):
        resumed = epoch_sampler(dataset, micro_batch, rank, world_size, seed=4)
        resumed.start_batch = 3 * accumulation  # the trainer's resume position: steps × accumulation micro-batches
        assert steps(resumed, 5) == straight[rank][3:], rank
    for step in range(8):  # and the ranks' items of a step are disjoint
        positions = [position for rank in straight for batch in rank[step] for position, _ in batch]
        assert len(set(positions)) == len(positions) == batch_size


def tiny_run(index: Path, out: Path, steps: int) -> None:
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    settings = TrainConfig(out=str(out), steps=steps, batch_size=4, log_every=1, checkpoint_every=2, device="cpu",
                           precision="fp32", lr=1e-3)
    train(DiTTask(config, sample_steps=2), TarShards(index, IMAGE_SIZE), settings)


def test_training_on_shards_resumed_mid_epoch_equals_an_uninterrupted_run(index, tmp_path):
    tiny_run(index, tmp_path / "straight", 8)  # 6 batches an epoch: the resume at 3 is mid-epoch, the run crosses one
    tiny_run(index, tmp_path / "resumed", 3)
    tiny_run(index, tmp_path / "resumed", 8)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == list(range(1, 9))
    assert [row["loss"] for row in resumed] == pytest.approx([row["loss"] for row in straight], abs=1e-6)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return path


def test_bad_shards_get_one_line_errors(index, tmp_path):
    with tarfile.open(index.parent / "train-000000.tar") as tar:
        name = next(name for name in tar.getnames() if not name.endswith(".cls"))
        image = tar.extractfile(name).read()
    suffix = Path(name).suffix
    unlabelled = write_tar(tmp_path / "unlabelled.tar", {"a.cls": b"1", f"a{suffix}": image, f"b{suffix}": image})
    with pytest.raises(UserError, match=f"sample b of shard {unlabelled} has no a label") as raised:
        TarShards(unlabelled, IMAGE_SIZE)
    assert "\n" not in str(raised.value)
    # With an index, the shard is first read when an item is.
    (tmp_path / "index.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "classes": list(CLASSES),
                                                     "shardlist": [{"url": "unlabelled.tar", "nsamples": 2}]}))
    described = TarShards(tmp_path / "index.json", IMAGE_SIZE)
    assert described[(0, False)]["label"] == 1
    with pytest.raises(UserError, match="sample b of shard .* has no a label"):
        described[(1, False)]
    broken = write_tar(tmp_path / "broken.tar", {"a.png": b"not a png", "a.cls": b"0"})
    with pytest.warns(UserWarning, match="skipping unreadable image a of shard"):
        assert TarShards(broken, IMAGE_SIZE)[(0, False)] is None
    with pytest.raises(UserError, match="not found"):
        TarShards(tmp_path / "missing-{0..1}.tar", IMAGE_SIZE)
    with pytest.raises(UserError, match="pack into at least 8 shards"):
        epoch_sampler(TarShards(index, IMAGE_SIZE), 1, 0, 8)
