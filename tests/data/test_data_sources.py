"""The data-source seam: a kind of data registered from this file alone (toy stripes, recognised by a `toy:` prefix)
trains a tiny DiT through the public API and is sampled from; a source decides its items' form once, where it is
opened, and the batches carry it; the sampler follows the sampling units a source declares; the wing sits low."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scalegen
from scalegen.data.batch import collate
from scalegen.data.caches import LatentCache, TokenCache
from scalegen.data.fashion_mnist import FashionMNIST
from scalegen.data.folder import ImageFolder
from scalegen.data.names import IMAGES, LATENTS, SOURCE_DESCRIPTIONS, TOKENS
from scalegen.data.registry import (
    CLASS_FOLDER, DATA_SOURCES, SourceKind, open_source, register_source, source_kind,
)
from scalegen.data.sampling import OnDevice, ResumableSampler, ShardSampler, epoch_sampler
from scalegen.data.source import DataSource, limited
from scalegen.data.store import build_cache
from scalegen.errors import UserError
from scalegen.cli.main import main
from scalegen.files import read_json
from scalegen.models.dit import DiTConfig
from scalegen.runs.folder import CONFIG_FILE, last_checkpoint
from scalegen.train.dit_task import DiTOptions, DiTTask, train_dit
from scalegen.train.trainer import TrainConfig
from tests_support import write_fashion_subset, write_image_folder

TOY_PREFIX = "toy:"  # "toy:N": N stripe images
STRIPE_CLASSES = ["horizontal", "vertical"]
IMAGE_SIZE = 8
CPU = torch.device("cpu")


class Stripes(DataSource):
    """`count` one-channel images of stripes two pixels wide: horizontal ones (class 0) or vertical ones (class 1),
    at a phase that changes with the index; the whole data set's code is this class and its registration below."""

    channels, num_classes, classes = 1, len(STRIPE_CLASSES), STRIPE_CLASSES

    def __init__(self, count: int, image_size: int):
        self.count, self.image_size = count, image_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        label = index % len(STRIPE_CLASSES)
        line = (torch.arange(self.image_size) + index // len(STRIPE_CLASSES)) // 2 % 2 * 2.0 - 1  # (S,) ±1
        image = (line.view(-1, 1) if label == 0 else line.view(1, -1)).expand(self.image_size, self.image_size)
        image = image.unsqueeze(0).contiguous()  # (1, S, S)
        return {"image": image.flip(-1) if flip else image, "label": torch.tensor(label)}

    def identity(self) -> dict:
        return {"kind": type(self).__name__, "count": self.count, "image_size": self.image_size}


TOY = register_source(SourceKind("toy-stripes", lambda data: data.startswith(TOY_PREFIX),
                                 lambda data, image_size: Stripes(int(data[len(TOY_PREFIX):]), image_size)))


class UnitStripes(Stripes):
    """Stripes read in runs of `unit` consecutive items, as tar shards are: it declares them as its sampling units."""

    def __init__(self, count: int, image_size: int, unit: int):
        super().__init__(count, image_size)
        self.shard_sizes = [min(unit, count - start) for start in range(0, count, unit)]


def test_a_toy_source_registered_here_trains_a_dit_and_samples_through_the_public_api(tmp_path):
    out = tmp_path / "run"
    options = DiTOptions(data=f"{TOY_PREFIX}32", image_size=IMAGE_SIZE, depth=1, hidden_size=32, num_heads=2,
                         patch_size=4, sample_steps=2)
    figures = train_dit(options, TrainConfig(out=str(out), steps=3, batch_size=8, log_every=1, device="cpu",
                                              precision="fp32"))
    assert torch.isfinite(torch.tensor(figures["loss"]))
    config = read_json(last_checkpoint(out) / CONFIG_FILE)
    assert (config["data"], config["classes"], config["model"]["in_channels"]) == (f"{TOY_PREFIX}32", STRIPE_CLASSES, 1)
    model = scalegen.load_dit(out)
    images = model.generate(["vertical", "horizontal"], steps=2, seed=0)  # the toy's class names, from the run
    assert images.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(model.generate([1, 0], steps=2, seed=0), images)


def test_the_registry_tries_the_built_in_kinds_in_order_then_the_registered_then_the_class_folder(tmp_path):
    assert list(DATA_SOURCES)[:3] == ["fashion-mnist", "tar-shards", "fashion-mnist-folder"]
    idx_folder = write_fashion_subset(tmp_path / "fashion")
    class_folder = write_image_folder(tmp_path / "classes")
    assert [source_kind(data).name for data in (
        "fashion-mnist", "train-{000000..000003}.tar", "one.tar", "index.json", str(idx_folder), f"{TOY_PREFIX}8",
        str(class_folder), f"{idx_folder}.tar",
    )] == ["fashion-mnist", "tar-shards", "tar-shards", "tar-shards", "fashion-mnist-folder", "toy-stripes",
           "class-folder", "tar-shards"]
    assert type(open_source(f"{TOY_PREFIX}8", IMAGE_SIZE)) is Stripes
    assert type(open_source(str(idx_folder), IMAGE_SIZE)) is FashionMNIST
    assert type(open_source(str(class_folder), IMAGE_SIZE)) is ImageFolder
    with pytest.raises(UserError, match="data folder .*missing does not exist; pass --data fashion-mnist or a folder"):
        open_source(str(tmp_path / "missing"), IMAGE_SIZE)
    assert register_source(TOY) is TOY  # registering the same kind again changes nothing
    with pytest.raises(ValueError, match="toy-stripes"):
        register_source(SourceKind(TOY.name, TOY.recognises, ImageFolder))


def test_data_help_lists_the_built_in_kinds_as_they_describe_themselves_in_the_order_they_are_tried(capsys):
    # The built-in kinds (these and the class folder, last) carry their descriptions from one place; the toy
    # registered here carries none, and `--help` (torch-free, without the registry) lists only the built-in kinds.
    described = [(kind.name, kind.description) for kind in (*DATA_SOURCES.values(), CLASS_FOLDER) if kind.description]
    assert described == list(SOURCE_DESCRIPTIONS.items())
    with pytest.raises(SystemExit):
        main(["train", "vqvae", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    at = [shown.index(" ".join(description.split())) for _, description in described]
    assert at == sorted(at)


def test_the_source_decides_the_form_and_every_batch_carries_it(tmp_path):
    stripes = open_source(f"{TOY_PREFIX}8", IMAGE_SIZE)
    batch = collate([stripes[(index, False)] for index in range(4)], stripes.form)
    assert stripes.form == batch.form == IMAGES and len(batch) == 4 and batch.skipped == 0
    assert batch.image.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE) and batch.latent is None and batch.tokens is None
    assert batch.label.tolist() == [0, 1, 0, 1]

    def pooled(images: torch.Tensor) -> dict[str, torch.Tensor]:  # (2B, 1, 8, 8) -> 4×4 "latents" and token ids
        latents = torch.nn.functional.avg_pool2d(images, 2)  # (2B, 1, 4, 4)
        return {"mean": latents.half(), "std": torch.zeros_like(latents).half(),
                "tokens": (latents.flatten(1) > 0).to(torch.int16)}  # (2B, 16)

    cache = build_cache(stripes, pooled, tmp_path / "cache", 4, "cpu", "pooling", {"data": stripes.identity()})
    latents, tokens = LatentCache(cache), TokenCache(cache)
    assert (latents.form, tokens.form) == (LATENTS, TOKENS)
    assert collate([latents[(0, False)], None], latents.form).form == LATENTS
    for source, field in ((latents, "latent"), (tokens, "tokens")):
        gathered = OnDevice(source, CPU).__getitems__([(1, False), (2, True)])
        assert gathered.form == source.form and gathered.image is None
        assert torch.equal(getattr(gathered, field), torch.stack([source[(1, False)][field], source[(2, True)][field]]))
    # A task reads the batch as its form says: a latents batch is diffused as it is, with no image and no codec.
    task = DiTTask(DiTConfig(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                             num_classes=2))
    loss, _ = task.loss(task.model, OnDevice(latents, CPU).__getitems__([(index, False) for index in range(4)]))
    assert torch.isfinite(loss)


def test_the_sampler_follows_the_units_a_source_declares():
    plain, units = Stripes(24, IMAGE_SIZE), UnitStripes(24, IMAGE_SIZE, unit=6)
    assert plain.shard_sizes is None and type(epoch_sampler(plain, 2, 0, 2)) is ResumableSampler
    assert units.shard_sizes == [6, 6, 6, 6] and isinstance(epoch_sampler(units, 2, 0, 2), ShardSampler)
    unit_of = [index // 6 for index in range(24)]
    for epoch in range(3):
        read = [{unit_of[index] for index, _ in epoch_sampler(units, 2, rank, 2, seed=1).epoch_items(epoch)}
                for rank in range(2)]
        assert not read[0] & read[1] and len(read[0]) == len(read[1]) == 2  # whole units, each rank its own
    assert limited(units, 15).shard_sizes == [6, 6, 3]  # the first units whole, the last one cut
    assert OnDevice(FashionMNIST(None, IMAGE_SIZE), CPU).shard_sizes is None
    with pytest.raises(UserError, match="--data-on-device needs a data set held in memory .* not Stripes"):
        OnDevice(plain, CPU)


SOURCE = Path(scalegen.__file__).parent
MOVED = ["data_defaults", "shards", "cache_store", "train/loading", "train/caches"]  # their homes before the wing


def test_the_wing_holds_the_data_code_and_imports_nothing_above_it():
    assert not [name for name in MOVED if (SOURCE / f"{name}.py").exists()] and not (SOURCE / "data.py").exists()
    for path in (SOURCE / "data").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        above = [name for name in imported
                 if name.startswith(tuple(f"scalegen.{wing}" for wing in ("train", "models", "runs", "cli",
                                                                              "tokenizers", "eval", "web")))]
        assert not above, f"{path.name} imports {above}"
    code = "import sys, scalegen.data.names; print(sorted(name for name in sys.modules if name.startswith('torch')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"  # the names `--help` shows load no torch
