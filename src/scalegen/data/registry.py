"""The data sources' registry: each kind of source says how it recognises a `--data` string and how it opens it
(`register_source`), and `open_source` opens the first kind that recognises the string — the class folder when none
does. A new kind of data is one module (or test file) that registers itself; nothing else changes.

The built-in kinds, in the order they are tried: `fashion-mnist` (the name), tar shards (a brace pattern
`train-{000000..000146}.tar`, one `.tar`, or the `.json` index `scalegen data pack` writes), a folder of Fashion-MNIST's
IDX files; then a kind registered later (a toy of a test); last the ImageNet-style class folder, which takes any
other string.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scalegen.classes import FASHION_MNIST_NAME
from scalegen.data.fashion_mnist import FashionMNIST, holds_fashion_mnist
from scalegen.data.folder import ImageFolder
from scalegen.data.names import SOURCE_DESCRIPTIONS
from scalegen.data.shards import names_tar_shards, TarShards
from scalegen.data.source import DataSource
from scalegen.registry import Registry


@dataclass(frozen=True)
class SourceKind:
    """A kind of data source.

    Args:
        name: how it is known ("tar-shards").
        recognises: whether a `--data` string names a source of this kind.
        opens: (the `--data` string, the image size) -> the source; a one-line `UserError` for bad data.
        description: what it reads, in words (a built-in kind's is its entry of `SOURCE_DESCRIPTIONS`).
    """

    name: str
    recognises: Callable[[str], bool]
    opens: Callable[[str, int], DataSource]
    description: str = ""


def built_in(name: str, recognises: Callable[[str], bool], opens: Callable[[str, int], DataSource]) -> SourceKind:
    """A built-in kind of data source, described by its entry of `SOURCE_DESCRIPTIONS`."""
    return SourceKind(name, recognises, opens, SOURCE_DESCRIPTIONS[name])


DATA_SOURCES: Registry[SourceKind] = Registry("data source kind")  # in the order they are tried
CLASS_FOLDER = built_in("class-folder", lambda data: True, ImageFolder)  # the fallback: any other string


def register_source(kind: SourceKind) -> SourceKind:
    """Make a kind of data source known to every `--data`, tried after those registered before it and before the
    class folder; returns it. A name is registered once (registering the same kind again changes nothing)."""
    return DATA_SOURCES.register(kind.name, kind)


def source_kind(data: str) -> SourceKind:
    """The kind of source a `--data` string names: the first registered kind that recognises it, else the class
    folder."""
    return next((kind for kind in DATA_SOURCES.values() if kind.recognises(data)), CLASS_FOLDER)


def open_source(data: str, image_size: int) -> DataSource:
    """The data source a `--data` string names (see the module's docstring for the kinds), its images at
    `image_size`; the source decides its items' form once, here."""
    return source_kind(data).opens(data, image_size)


register_source(built_in("fashion-mnist", lambda data: data == FASHION_MNIST_NAME,
                         lambda data, image_size: FashionMNIST(None, image_size)))
register_source(built_in("tar-shards", names_tar_shards, TarShards))
register_source(built_in("fashion-mnist-folder", holds_fashion_mnist, FashionMNIST))
