"""Encoded copies of a data set (latents, tokens) stored as shards that every rank builds and every rank reads
memory-mapped, so that neither building nor reading a cache of ImageNet's size holds it in one process's memory.

A cache is a folder:
    CACHE/manifest.json                  {"format", "items", "shard_size", "description", "source", "shards",
                                          "complete"}
    CACHE/shard-000000.safetensors       items [0, shard_size): each field (n, 2, ...) — [:, 0] the image, [:, 1] its
    CACHE/shard-000001.safetensors       mirror — plus "labels" (n,) and "indices" (n,), the items' data set indices
Shard s covers the data set's items [s·shard_size, (s+1)·shard_size); rank r of W encodes the shards s ≡ r (mod W)
that are missing, each written under a temporary name and renamed into place, so an extraction killed midway keeps
every finished shard and a re-run encodes only the rest. A rank that is done waits for the others' shards by looking
at the folder, never in a collective (NCCL's would time out while another rank encodes for an hour). Rank 0 marks the
manifest complete once every shard is there; the others start training when they read that mark. The manifest's
"source" records what the items were made from (the data set's identity, a digest of the encoder's weights): a cache,
finished or not, is extended or used only by a run of the same source, so it never mixes two encoders' or data sets'
items nor trains a run on another's.

Shards are written by safetensors and read memory-mapped with the kernel told that reads are random (no read-ahead):
a training rank's resident memory holds only the items it reads (the operating system's page cache aside), whatever
the data set's size, and a cold read fetches little more than the item (through safetensors' own map, 1.5 MB of
storage reads for each 16 KB item of a cold cache; 24 KB through this one: bench/scale.py). A cache of the earlier
one-file format (the same fields, one safetensors file) loads the same way.
"""
from __future__ import annotations

import bisect
import json
import math
import mmap
import struct
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scalegen.data.batch import collate
from scalegen.data.source import DataSource
from scalegen.distributed import DistributedContext
from scalegen.errors import UserError
from scalegen.files import read_json, save_weights_atomic, write_json_atomic
from scalegen.fingerprint import state_digest

CACHE_FORMAT = "scalegen-cache-v1"
MANIFEST_FILE = "manifest.json"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
SHARD_DIGITS = 6
CACHE_SHARD_SIZE = 2048  # images per shard: 64 MB of SD-VAE latents at 256 px, a few minutes of one GPU's encoding
WAIT_SECONDS = 0.5  # how often a rank that is done looks for the other ranks' shards
DIGEST_SHOWN = 12  # characters of a digest that a message shows
# What each state-dict entry's bytes follow in the encoder's digest a manifest records: changing it would make every
# existing cache look made by another encoder.
CACHE_DIGEST_HEADER = "{name} {dtype} {shape}\n"
LABELS, INDICES = "labels", "indices"  # the fields every shard holds beside the encoded ones
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
HEADER_LENGTH = struct.Struct("<Q")  # a safetensors file starts with its JSON header's length, then the header


def shard_name(shard: int) -> str:
    """The file name of shard `shard`."""
    return f"{SHARD_PREFIX}{shard:0{SHARD_DIGITS}d}{SHARD_SUFFIX}"


class IndexedItems(Dataset):
    """A source's items with their index beside them ("index"), so a batch says which items it kept when some could
    not be read."""

    def __init__(self, dataset: DataSource):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, bool]) -> dict | None:
        found = self.dataset[item]
        return None if found is None else {**found, "index": torch.tensor(item[0])}


def read_manifest(folder: Path) -> dict | None:
    """The cache's manifest, or None when there is none yet."""
    path = folder / MANIFEST_FILE
    return read_json(path) if path.exists() else None


def weights_digest(module: nn.Module) -> str:
    """A digest of a network's weights (every state-dict entry's name, dtype, shape and bytes, unrounded): what a cache
    records of the encoder that made it."""
    return state_digest(module.state_dict(), CACHE_DIGEST_HEADER)


def source_differences(wanted: dict, made: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """The entries (dotted names, as "data.files") where two sources differ: (name, wanted, made)."""
    differences = []
    for name in dict.fromkeys([*wanted, *made]):
        value, earlier = wanted.get(name), made.get(name)
        if isinstance(value, dict) and isinstance(earlier, dict):
            differences += source_differences(value, earlier, f"{prefix}{name}.")
        elif value != earlier:
            differences.append((prefix + name, value, earlier))
    return differences


def shown(value: object) -> str:
    """A source entry in a message: a digest by its first characters."""
    if isinstance(value, str) and len(value) > DIGEST_SHOWN:
        return json.dumps(value[:DIGEST_SHOWN] + "…", ensure_ascii=False)
    return json.dumps(value)


def check_plan(manifest: dict, plan: dict, folder: Path) -> None:
    """Refuse to extend or use a cache made from other data, by another encoder or cut into other shards.

    A cache made before caches recorded their source cannot be checked: it is used as it is, with a warning.
    """
    for name in ("format", "items", "shard_size"):
        if manifest.get(name) != plan[name]:
            raise UserError(f"{folder} is a cache of {manifest.get('items')} items in shards of "
                            f"{manifest.get('shard_size')} ({manifest.get('format')}), this run has {plan['items']} in "
                            f"shards of {plan['shard_size']}; move {folder} away to extract anew, or use the same "
                            "--data and --max-images")
    if "source" not in manifest:
        warnings.warn(f"{folder} does not say what it was made from (an earlier scalegen made it), so it is used as it "
                      "is; move it away to extract anew if the data or the encoder changed since", stacklevel=3)
        return
    differences = ", ".join(f"{name} {shown(value)} (was {shown(earlier)})" for name, value, earlier
                            in source_differences(plan["source"], manifest["source"]))
    if differences:
        raise UserError(f"{folder} was made from another source than this run's: {differences}; move "
                        f"{folder} away to extract it anew, or pass the --data, --image-size and --vae or --tokenizer "
                        "it was made with")


def encode_shard(
    dataset: DataSource, encode: Callable[[torch.Tensor], dict[str, torch.Tensor]], items: range, path: Path,
    batch_size: int, device: torch.device | str, num_workers: int, progress: tqdm,
) -> None:
    """Encode the items `items` of `dataset` and their mirrors into the shard file `path` (written atomically)."""
    for leftover in path.parent.glob(f".{path.name}.*"):  # what a killed writer of this shard left
        leftover.unlink(missing_ok=True)
    loader = DataLoader(IndexedItems(dataset), batch_size=batch_size, sampler=[(index, False) for index in items],
                        collate_fn=partial(collate, form=dataset.form), num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = {LABELS: [], INDICES: []}
    for batch in loader:
        progress.update(len(batch) + batch.skipped)
        if len(batch) == 0:
            continue  # every image of this batch was unreadable (already warned about)
        images = batch.image.to(device)  # (B, C, H, W)
        for name, encoded in encode(torch.cat([images, images.flip(-1)])).items():  # (2B, ...)
            parts.setdefault(name, []).append(torch.stack(encoded.chunk(2), dim=1).cpu())  # (B, 2, ...)
        parts[LABELS].append(batch.label)
        parts[INDICES].append(batch.index)
    save_weights_atomic({name: torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
                         for name, chunks in parts.items()}, path)


def wait_for(paths: list[Path], description: str, show: bool) -> None:
    """Wait until every path exists (the other ranks' shards), looking every few seconds."""
    missing = list(paths)
    with tqdm(total=len(paths), desc=description, unit="shard", disable=not show) as progress:
        while True:
            missing = [path for path in missing if not path.exists()]
            progress.update(len(paths) - len(missing) - progress.n)
            if not missing:
                return
            time.sleep(WAIT_SECONDS)


@torch.no_grad()
def build_cache(
    dataset: DataSource,
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    folder: str | Path,
    batch_size: int,
    device: torch.device | str,
    description: str,
    source: dict,
    context: DistributedContext | None = None,
    shard_size: int = CACHE_SHARD_SIZE,
    num_workers: int = 0,
) -> Path:
    """Encode every image of `dataset` and its mirror once into the sharded cache `folder`, over all ranks.

    Every rank calls this with the same arguments; each encodes its missing shards, then waits (without a collective)
    until the cache is complete. A complete cache of the same source is returned as it is; one of another source,
    complete or not, is refused (`check_plan`).

    Args:
        dataset: a source of images (items {"image", "label"} addressed by (index, flip)); unreadable images are
            skipped.
        encode: images (2B, C, H, W) on `device` -> named tensors (2B, ...), already in their storage dtype.
        folder: the cache folder.
        batch_size, device, num_workers: how to encode (batches never cross a shard, so any world size writes the same
            bytes).
        description: the progress bar's label.
        source: what the items are made from, JSON-able (the data set's identity, the encoder's weights digest).
        context: this process's rank and world size (None: a single process).
        shard_size: items per shard.
    Returns:
        The folder.
    """
    folder = Path(folder)
    rank, world_size = (context.rank, context.world_size) if context is not None else (0, 1)
    plan = {"format": CACHE_FORMAT, "items": len(dataset), "shard_size": shard_size, "description": description,
            "source": json.loads(json.dumps(source))}  # as the manifest reads back: tuples as lists
    manifest = read_manifest(folder)
    if manifest is not None:
        check_plan(manifest, plan, folder)
        if manifest.get("complete"):
            return folder
    shards = [shard_name(shard) for shard in range(math.ceil(len(dataset) / shard_size))]
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0 and manifest is None:
        write_json_atomic(folder / MANIFEST_FILE, {**plan, "shards": shards, "complete": False})
    mine = [shard for shard in range(rank, len(shards), world_size) if not (folder / shards[shard]).exists()]
    items = [range(shard * shard_size, min((shard + 1) * shard_size, len(dataset))) for shard in mine]
    label = f"{description} (rank {rank} of {world_size})" if world_size > 1 else description
    with tqdm(total=sum(map(len, items)), desc=label, unit="img", disable=rank != 0) as progress:
        for shard, shard_items in zip(mine, items):
            encode_shard(dataset, encode, shard_items, folder / shards[shard], batch_size, device, num_workers,
                         progress)
    wait_for([folder / name for name in shards], "waiting for the other ranks' shards",
             show=rank == 0 and world_size > 1)  # a single process has no other ranks to wait for
    if rank == 0:
        write_json_atomic(folder / MANIFEST_FILE, {**plan, "shards": shards, "complete": True})
    while not (read_manifest(folder) or {}).get("complete"):
        time.sleep(WAIT_SECONDS)
    return folder


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private memory map that the kernel reads at random (no
    read-ahead): nothing is read until an item is. (safetensors' own loader maps the file with read-ahead.)

    Raises:
        UserError: the file is missing or not a safetensors file.
    """
    unreadable = f"cannot read the cache file {path}"
    try:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable views, file untouched
        if hasattr(mapped, "madvise"):  # Linux and macOS
            mapped.madvise(mmap.MADV_RANDOM)
        (length,) = HEADER_LENGTH.unpack_from(mapped)
        header = json.loads(mapped[HEADER_LENGTH.size : HEADER_LENGTH.size + length])
    except (OSError, ValueError, struct.error) as error:
        raise UserError(f"{unreadable} ({error}); move the cache away and re-run to extract it anew") from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"{unreadable}: {name} has the type {entry.get('dtype')}; move the cache away and re-run")
        dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
        offset = HEADER_LENGTH.size + length + begin
        count = (end - begin) // dtype.itemsize
        try:
            flat = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset) if count
                    else torch.empty(0, dtype=dtype))  # (numel,)
            tensors[name] = flat.view(entry["shape"])  # (N, 2, ...) or (N,)
        except (ValueError, RuntimeError) as error:  # offsets past the end of a truncated file
            raise UserError(f"{unreadable} ({error}); move the cache away and re-run to extract it anew") from None
    return tensors


class CachedArrays:
    """The fields of a cache (a sharded folder, or a file of the earlier one-file format), memory-mapped.

    Items are numbered across the shards in order; `rows(name, indices, flips)` reads items of one field.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            manifest = read_manifest(path)
            if manifest is None or not manifest.get("complete") or manifest.get("format") != CACHE_FORMAT:
                raise UserError(f"{path} is not a complete scalegen cache; re-run the training command to finish it, "
                                "or move it away to extract anew")
            files = [path / name for name in manifest["shards"]]
        else:
            files = [path]
        self.parts: list[dict[str, torch.Tensor]] = []
        for file in files:
            tensors = mapped_tensors(file)
            if LABELS not in tensors:
                raise UserError(f"{file} is not a scalegen cache (it has no {LABELS!r}); move it away and re-run to "
                                "extract it anew")
            if len(tensors[LABELS]):
                # The one-file format kept no indices: its items were the data set's, in order.
                tensors.setdefault(INDICES, torch.arange(len(tensors[LABELS])))
                self.parts.append(tensors)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part[LABELS]))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        """The shard holding item `index` and the item's row in it."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of a cache of {len(self)}")
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part], index - self.starts[part]

    def row(self, name: str, index: int, flip: bool | None = None) -> torch.Tensor:
        """Item `index` of field `name` (its image or mirror when `flip` is given), read from the shard."""
        part, row = self.locate(index)
        return part[name][row] if flip is None else part[name][row, int(flip)]

    def rows(self, name: str, indices: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
        """Items `indices` (B,) of field `name` (each its image or mirror when `flips` (B,) is given), stacked."""
        if len(self.parts) == 1:  # one (memory-mapped or on-device) part: a single gather
            field = self.parts[0][name]
            return field[indices] if flips is None else field[indices, flips.long()]  # (B, ...)
        flips = [None] * len(indices) if flips is None else flips.tolist()
        return torch.stack([self.row(name, index, flip) for index, flip in zip(indices.tolist(), flips)])  # (B, ...)

    def column(self, name: str) -> torch.Tensor:
        """Field `name` of every item, in order (read whole: for small fields such as the indices)."""
        return torch.cat([part[name] for part in self.parts]) if self.parts else torch.zeros(0, dtype=torch.long)

    def to(self, device: torch.device | str) -> CachedArrays:
        """Every field concatenated into one part on `device` (`--data-on-device`: the whole cache in its memory)."""
        names = self.parts[0].keys() if self.parts else ()
        self.parts = [{name: torch.cat([part[name] for part in self.parts]).to(device) for name in names}]
        self.starts = [0, len(self.parts[0][LABELS])] if self.parts else [0]
        return self
