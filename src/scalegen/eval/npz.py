"""ADM sample files and image folders: uint8 (N, H, W, 3) images read batch by batch, `.npz` archives written array
by array (50,000 images never sit in memory at once), and the reference statistics an ADM batch may carry.
"""
from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np
from PIL import Image

from scalegen.errors import UserError

LABELS_KEY = "labels"  # our samplers store the requested classes beside arr_0 (ADM reads only arr_0)
# ... and which classes those labels are: the sampled model's class count and, when known, its class names.
NUM_CLASSES_KEY, CLASS_NAMES_KEY = "num_classes", "class_names"
# ... and how they were drawn: a JSON string (0-d array) such as {"labels": "balanced", "seed": 0, ...}.
PROTOCOL_KEY = "protocol"
IMAGES_KEY = "arr_0"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class ImageBatches:
    """uint8 (N, H, W, 3) images read batch by batch from an ADM `.npz` (`arr_0`) or an image folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {self.path}")
            self.shape = (len(self.files), *read_image(self.files[0]).shape)
        elif self.path.is_file():
            with npz_member(self.path, IMAGES_KEY) as member:
                self.shape = read_npy_header(member, self.path)
        else:
            raise UserError(f"{self.path} not found: give an .npz file with arr_0 or an image folder")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 (B, H, W, 3) batches."""
        if self.path.is_dir():
            for start in range(0, len(self.files), batch_size):
                images = [read_image(file, self.shape[1:]) for file in self.files[start:start + batch_size]]
                yield np.stack(images)
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with npz_member(self.path, IMAGES_KEY) as member:
            read_npy_header(member, self.path)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = member.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise UserError(f"{self.path}: arr_0 is truncated; write the file again")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def read_image(file: Path, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One RGB image as uint8 (H, W, 3); all images of a folder must share one size."""
    try:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {file} ({error}): remove or replace it") from error
    if expected_shape is not None and array.shape != tuple(expected_shape):
        raise UserError(f"{file} is {array.shape[1]}x{array.shape[0]}, other images {expected_shape[1]}x"
                        f"{expected_shape[0]}: resize the folder to one size")
    return array


def npz_keys(path: Path) -> list[str]:
    """Names of the arrays in an .npz file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [name.removesuffix(".npy") for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{path} is not an .npz file ({error}): give an .npz with arr_0 or an image folder") from error


@contextlib.contextmanager
def npz_member(path: Path, name: str) -> Iterator[BinaryIO]:
    """Open `name`.npy inside an .npz for streaming reads, so 50,000 images never have to sit in memory."""
    keys = npz_keys(path)
    if name not in keys:
        raise UserError(f"{path} has no '{name}' array (it has {keys}): ADM files keep the images in arr_0")
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        yield member


def read_npy_header(member: BinaryIO, path: Path) -> tuple[int, ...]:
    """Read an .npy header and check it holds uint8 (N, H, W, 3) in C order; returns the shape."""
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(member)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
        raise UserError(f"{path}: arr_0 is {dtype} {shape}; it must be uint8 (N, H, W, 3) as ADM's sample files")
    return tuple(shape)


def read_npz_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """The precomputed statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) an ADM reference batch carries, if any."""
    path = Path(path)
    if path.is_dir() or not set(STATISTICS_KEYS) & set(npz_keys(path)):
        return {}
    with np.load(path) as archive:
        return {key: archive[key] for key in STATISTICS_KEYS if key in archive.files}


class SampleLabels(NamedTuple):
    """What a sample file says of its classes; each field None where the file does not say."""

    labels: np.ndarray | None  # (N,) the class asked for each image
    num_classes: int | None  # the sampled model's class count
    class_names: list[str] | None  # ... and its class names
    protocol: dict | None  # how the labels were drawn (`PROTOCOL_KEY`'s JSON)


def read_labels(path: str | Path) -> SampleLabels:
    """What a sample file says of its classes (all None for an image folder or a plain ADM file), read in one
    opening of the file."""
    path = Path(path)
    keys = [] if path.is_dir() else npz_keys(path)
    if not {LABELS_KEY, NUM_CLASSES_KEY, CLASS_NAMES_KEY, PROTOCOL_KEY} & set(keys):
        return SampleLabels(None, None, None, None)
    with np.load(path) as archive:
        return SampleLabels(archive[LABELS_KEY] if LABELS_KEY in keys else None,
                            int(archive[NUM_CLASSES_KEY]) if NUM_CLASSES_KEY in keys else None,
                            archive[CLASS_NAMES_KEY].tolist() if CLASS_NAMES_KEY in keys else None,
                            json.loads(str(archive[PROTOCOL_KEY])) if PROTOCOL_KEY in keys else None)


def has_images(path: str | Path) -> bool:
    """Whether a path is an image folder or an .npz with `arr_0`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: give an .npz file or an image folder")
    return path.is_dir() or IMAGES_KEY in npz_keys(path)


class NpzWriter:
    """Writes an ADM-format .npz array by array; images can be streamed in batches into `arr_0`."""

    def __init__(self, path: str | Path):
        self.archive = zipfile.ZipFile(path, "w", allowZip64=True)
        self.images: BinaryIO | None = None

    def begin_images(self, shape: tuple[int, ...]) -> None:
        """Start `arr_0` of uint8 images with the given (N, H, W, 3) shape."""
        self.images = self.archive.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.images, header)

    def add_images(self, batch: np.ndarray) -> None:
        """Append a uint8 (B, H, W, 3) batch to `arr_0`."""
        self.images.write(np.ascontiguousarray(batch, dtype=np.uint8).tobytes())

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Write one whole array (closes `arr_0` first)."""
        if self.images is not None:
            self.images.close()
            self.images = None
        with self.archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(array))

    def close(self) -> None:
        """Finish the file."""
        if self.images is not None:
            self.images.close()
        self.archive.close()


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ADM-format .npz (e.g. `arr_0` uint8 NHWC and/or `mu`, `sigma`, `mu_s`, `sigma_s`)."""
    writer = NpzWriter(path)
    for name, array in arrays.items():
        writer.add_array(name, array)
    writer.close()
