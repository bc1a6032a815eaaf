"""WebDataset-style tar shards: their samples read at random through wids (`TarSamples`), the data source over them
(`TarShards`), and their writing (`write_shards`; `pack_folder` packs a class folder).

A shard is a plain tar whose samples are consecutive members sharing a key: `KEY.jpg|jpeg|png|webp` (the encoded
image) and `KEY.cls` (its class id in ASCII), the WebDataset convention. `--data` names shards three ways: a brace
pattern (`train-{000000..000146}.tar`), one `.tar`, or the JSON index that `scalegen data pack` writes beside them
(wids's `wids-shard-index-v1` layout, plus the class names under "classes"). Items are numbered through the shards in
order, and `TarShards` declares the shards' sizes as its sampling units, so the training samplers deal whole shards
to ranks (data/sampling.py); it decodes the images as an image folder does.

Why wids: scalegen's training reads items by (index, flip) in an order drawn from the seed, which is what lets a killed
run resume on exactly the batches an uninterrupted run would have seen. wids, by WebDataset's author, gives random
access to the samples of a tar shard through an index of its members over a memory map, so shards are addressed like
any other data set: each rank reads its own disjoint shards in a per-epoch order drawn from the seed, and a resume
starts at an index instead of replaying a stream. Shards on a local disk or NFS need no downloader, cache or streaming
pipeline. The alternatives fit less well: webdataset's 1.x releases dropped wids and read shards as streams, while
litdata and MosaicML's streaming read only their own formats.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import random
import tarfile
from collections.abc import Collection
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand
from tqdm import tqdm
from wids.wids import IndexedTarSamples, splitname
from wids.wids_lru import LRUCache

from scalegen.data.folder import class_folder_files, files_digest, image_item
from scalegen.data.names import DEFAULT_IMAGES_PER_SHARD
from scalegen.data.source import DataSource
from scalegen.errors import UserError
from scalegen.files import first_line, replace_atomically, write_json_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PACKED_SUFFIXES = {".jpeg": ".jpg"}  # a shard names each format one way
LABEL_SUFFIX = ".cls"
INDEX_SUFFIX = ".json"
SOURCE_SUFFIXES = (".tar", INDEX_SUFFIX)  # `--data` names tar shards: one shard, or their JSON index
INDEX_KIND = "wids-shard-index-v1"
SHARD_DIGITS = 6  # train-000000.tar, as ImageNet's published shards
KEY_DIGITS = 9  # a sample's key is its zero-padded position over all shards
SHARDS_IN_FLIGHT = 4  # a rank shuffles its items within groups of this many consecutive shards of its list
OPEN_SHARDS = 2 * SHARDS_IN_FLIGHT  # shards a process keeps open: the group it reads and the next
SOURCE_HELP = "pass --data a brace pattern such as train-{000000..000146}.tar, one .tar, or the .json index of pack"


def check_members(suffixes: Collection[str], key: str, path: Path) -> None:
    """Refuse a sample that lacks an image or a label."""
    missing = [] if any(suffix in suffixes for suffix in IMAGE_SUFFIXES) else ["an image (.jpg/.png/.webp)"]
    missing += [] if LABEL_SUFFIX in suffixes else ["a label (.cls)"]
    if missing:
        raise UserError(f"sample {key} of shard {path} has no {' and no '.join(missing)}; every sample needs "
                        "KEY.jpg|png|webp and KEY.cls (pack a class folder with `scalegen data pack`)")


def parse_label(payload: bytes, key: str, path: Path) -> int:
    """A `.cls` member's class id."""
    try:
        return int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"sample {key} of shard {path} has the label {payload[:20]!r}, not a class id; write each "
                        "KEY.cls as an ASCII integer") from None


def open_shard(path: Path) -> IndexedTarSamples:
    """A shard's samples, indexed for random access (the file stays open until `close`)."""
    if not path.is_file():
        raise UserError(f"shard {path} not found; {SOURCE_HELP}")
    if not tarfile.is_tarfile(path):
        raise UserError(f"{path} is not a tar file; {SOURCE_HELP}")
    return IndexedTarSamples(path=str(path))


def scan_shard(path: Path) -> list[int]:
    """The labels of a shard's samples in order, checking that each has an image and a label (reads no image)."""
    samples = open_shard(path)
    try:
        names = list(samples.reader.names())
        labels = []
        for members in samples.samples:
            suffixes = {splitname(names[member])[1]: member for member in members}
            key = splitname(names[members[0]])[0]
            check_members(suffixes, key, path)
            payload = samples.reader.get_file(suffixes[LABEL_SUFFIX])[1].getvalue()
            labels.append(parse_label(payload, key, path))
        return labels
    finally:
        samples.close()


def read_index(path: Path) -> tuple[list[Path], list[int], list[str] | None]:
    """The shards (their paths relative to the index's folder), their sample counts and the class names of a JSON
    shard index; the names are None when it has none."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read the shard index {path} ({first_line(error)}); {SOURCE_HELP}") from None
    not_an_index = f"{path} is not a {INDEX_KIND} shard index; {SOURCE_HELP}"
    if not isinstance(payload, dict) or payload.get("__kind__") != INDEX_KIND:
        raise UserError(not_an_index)
    try:
        paths = [path.parent / entry["url"] for entry in payload["shardlist"]]
        sizes = [int(entry["nsamples"]) for entry in payload["shardlist"]]
    except (KeyError, TypeError, ValueError):
        raise UserError(not_an_index) from None
    return paths, sizes, payload.get("classes") or None


class TarSamples:
    """The samples of WebDataset-style tar shards, read at random through wids: sample i is the i-th counting through
    the shards in order, given as (image stream, class id, name for messages).

    A process opens shards lazily and keeps the last OPEN_SHARDS open, so loader workers forked from it open their
    own. A sample without an image or a label, or with a label outside the classes, is a one-line error.

    Args:
        source: a brace pattern, one `.tar`, or the JSON index `write_shards` writes (its "classes" name the classes;
            without names, the labels are scanned at open to count the classes).
    """

    def __init__(self, source: str | Path):
        source = str(source)
        self.classes: list[str] | None = None
        if source.endswith(INDEX_SUFFIX):
            self.paths, self.shard_sizes, self.classes = read_index(Path(source))
        else:
            self.paths = [Path(path) for path in braceexpand(source)]
        labels = None
        if self.classes is None:  # the number of classes comes from the labels themselves
            labels = [scan_shard(path) for path in self.paths]
            self.shard_sizes = [len(shard_labels) for shard_labels in labels]
        if sum(self.shard_sizes) == 0:
            raise UserError(f"the shards of {source} hold no samples; {SOURCE_HELP}")
        self.starts = [0, *accumulate(self.shard_sizes)][:-1]  # each shard's first sample
        self.num_classes = len(self.classes) if self.classes else 1 + max(label for shard in labels for label in shard)
        self.open_shards: LRUCache | None = None
        self.owner: int | None = None  # the process that opened `open_shards`

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def __getstate__(self) -> dict:
        """Pickled (for a spawned loader worker) without the open shards, which the new process opens itself."""
        return {**self.__dict__, "open_shards": None, "owner": None}

    def shard(self, shard: int) -> IndexedTarSamples:
        """Shard `shard`'s samples, opened by this process."""
        if self.owner != os.getpid():  # a forked loader worker must not share its parent's open files
            self.open_shards = LRUCache(OPEN_SHARDS, release_handler=lambda _, samples: samples.close())
            self.owner = os.getpid()
        samples = self.open_shards[shard]
        if samples is None:
            samples = open_shard(self.paths[shard])
            if len(samples) != self.shard_sizes[shard]:
                count = len(samples)
                samples.close()
                raise UserError(f"shard {self.paths[shard]} holds {count} samples, its index says "
                                f"{self.shard_sizes[shard]}; pack the shards again or pass their brace pattern")
            self.open_shards[shard] = samples
        return samples

    def __getitem__(self, index: int) -> tuple[BinaryIO, int, str]:
        shard = bisect.bisect_right(self.starts, index) - 1
        path = self.paths[shard]
        sample = self.shard(shard)[index - self.starts[shard]]
        key = sample["__key__"]
        check_members(sample, key, path)
        label = parse_label(sample[LABEL_SUFFIX].getvalue(), key, path)
        if not 0 <= label < self.num_classes:
            raise UserError(f"sample {key} of shard {path} has class {label}, outside the classes "
                            f"0..{self.num_classes - 1}; pack the shards again")
        image = next(sample[suffix] for suffix in IMAGE_SUFFIXES if suffix in sample)
        return image, label, f"{key} of shard {path}"


def names_tar_shards(data: str) -> bool:
    """Whether a `--data` string names tar shards: a brace pattern, one `.tar` or the `.json` index."""
    return "{" in data or data.endswith(SOURCE_SUFFIXES)


class TarShards(DataSource):
    """WebDataset-style tar shards (`KEY.jpg|png|webp` + `KEY.cls`), decoded as `ImageFolder` decodes its files; item
    i is the i-th sample counting through the shards, whose sizes are its sampling units (`shard_sizes`), which the
    sampler deals out whole.

    Args:
        source: a brace pattern (`train-{000000..000146}.tar`), one `.tar`, or the index `pack_folder` writes, whose
            class names become `classes` (None otherwise).
        image_size: the side of the square crop.
    """

    channels = 3

    def __init__(self, source: str | Path, image_size: int):
        self.samples, self.image_size = TarSamples(source), image_size
        self.classes, self.num_classes = self.samples.classes, self.samples.num_classes
        self.shard_sizes = self.samples.shard_sizes

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self) -> dict:
        """Its kind, crop size and a digest of its shards (names, sample counts, sizes, modification times)."""
        shards = ((path.name, path, size) for path, size in zip(self.samples.paths, self.shard_sizes))
        return {"kind": type(self).__name__, "image_size": self.image_size, "files": files_digest(shards)}

    def __getitem__(self, item: tuple[int, bool]) -> dict | None:
        index, flip = item
        image, label, name = self.samples[index]
        return image_item(image, label, self.image_size, flip, name)


def write_shard(path: Path, samples: list[tuple[str, Path, int]], progress: tqdm) -> None:
    """One tar of samples (key, image file, label): `KEY.<ext>` holding the file's bytes and `KEY.cls`. Members keep
    tarfile's fixed defaults (time 0, owner root, mode 644), so packing a folder twice writes the same bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in samples:
            suffix = image.suffix.lower()
            for name, payload in ((key + PACKED_SUFFIXES.get(suffix, suffix), image.read_bytes()),
                                  (key + LABEL_SUFFIX, str(label).encode("ascii"))):
                member = tarfile.TarInfo(name)
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
            progress.update()


def write_shards(files: list[tuple[Path, int]], classes: list[str], prefix: str | Path,
                 images_per_shard: int = DEFAULT_IMAGES_PER_SHARD, seed: int = 0) -> Path:
    """Write labelled image files as WebDataset-style tar shards and their JSON index (`pack_folder` gives it a class
    folder's files).

    The files are shuffled with `seed` first, so every shard mixes the classes; each keeps its bytes (no re-encoding).
    Each shard is written under a temporary name and renamed into place, the index last.

    Args:
        files: (JPEG, PNG or WebP file, class id) pairs.
        classes: the class names, stored in the index.
        prefix: writes `PREFIX-000000.tar`, `PREFIX-000001.tar`, … and `PREFIX.json`.
        images_per_shard: samples per shard (the last one holds the rest).
        seed: the shuffle's seed.
    Returns:
        The index `PREFIX.json`, which `--data` takes.
    """
    prefix = Path(prefix)
    if images_per_shard < 1:
        raise UserError(f"images per shard must be at least 1, got {images_per_shard}")
    others = [path for path, _ in files if path.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise UserError(f"{others[0]} and {len(others) - 1} other file(s) are not JPEG, PNG or WebP, the formats shards "
                        "hold; convert them first")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    shardlist = []
    with tqdm(total=len(files), desc="packing", unit="image") as progress:
        for shard, first in enumerate(range(0, len(files), images_per_shard)):
            positions = range(first, min(first + images_per_shard, len(files)))
            samples = [(f"{position:0{KEY_DIGITS}d}", *files[order[position]]) for position in positions]
            path = prefix.with_name(f"{prefix.name}-{shard:0{SHARD_DIGITS}d}.tar")
            replace_atomically(path, partial(write_shard, samples=samples, progress=progress))
            shardlist.append({"url": path.name, "nsamples": len(samples), "filesize": path.stat().st_size})
    index = prefix.with_name(prefix.name + INDEX_SUFFIX)
    write_json_atomic(index, {"__kind__": INDEX_KIND, "name": prefix.name, "shardlist": shardlist, "classes": classes})
    return index


def pack_folder(folder: str | Path, prefix: str | Path, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                seed: int = 0) -> Path:
    """Pack an ImageNet-style class folder (JPEG, PNG or WebP files) into WebDataset-style tar shards
    `PREFIX-000000.tar`, … and their index `PREFIX.json` naming the classes (`scalegen data pack`); the images are
    shuffled with `seed` so every shard mixes the classes. Returns the index, which `--data` takes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist; pass a folder of class folders")
    classes, files = class_folder_files(folder)
    if not files:
        raise UserError(f"no images found in {folder}; expected one sub-folder per class holding image files")
    return write_shards(files, classes, prefix, images_per_shard, seed)
