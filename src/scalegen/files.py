"""File I/O that a crash, a full disk or a bad file cannot turn into lost work or a traceback.

Writes go to a temporary name in the same folder, are fsync'ed, then renamed over the target (and the folder is
fsync'ed too), with the permissions the user's umask gives new files — not the 0600/0700 of `tempfile`. Reads of
JSON, safetensors and torch files give a one-line `UserError` when the file is truncated, garbage or unsafe.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scalegen.errors import UserError

FULL_MODE, FILE_MODE = 0o777, 0o666  # what umask is taken from, for folders and for files
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_MARKERS = ("No space left", "os error 28", "error code: 28")  # how torch and safetensors word ENOSPC


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path, directory: bool = False) -> None:
    """Give a temporary file or folder the permissions a plain `open`/`mkdir` would have given it."""
    os.chmod(path, (FULL_MODE if directory else FILE_MODE) & ~current_umask())


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's contents to the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def make_temporary_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder under `parent` with the umask's permissions."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    follow_umask(folder, directory=True)
    return folder


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(temporary)` in the same folder, fsync it, rename it over `path`, fsync the folder."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        follow_umask(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file renamed over `path`."""
    replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(payload, indent=2)))


def save_weights_atomic(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written under a temporary name, then renamed."""
    replace_atomically(path, lambda temporary: save_file(contiguous_copy(state_dict), temporary))


def contiguous_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}


def json_config(config) -> dict:
    """`asdict(config)` as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(asdict(config)))


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def is_disk_full(error: BaseException) -> bool:
    """Whether an error from a write means the disk (or the quota) is full."""
    return getattr(error, "errno", None) in DISK_FULL_ERRNOS or any(marker in str(error) for marker in NO_SPACE_MARKERS)


def write_failure(error: BaseException) -> str:
    """Why a write failed, in words: "no space left on the device", "permission denied", …"""
    if is_disk_full(error):
        return "no space left on the device"
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()
    return first_line(error)


def read_json(path: Path) -> dict:
    """A JSON object from a file; a one-line error when it is not valid JSON or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path} ({first_line(error)}); restore it from a copy or train the run again") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} holds a JSON {type(payload).__name__}, not an object; restore it from a copy")
    return payload


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a one-line error when it is truncated or no safetensors file at all."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"cannot read {path} ({first_line(error)}): it is truncated or not a safetensors file; "
                        "export or train it again") from None


class StoredArguments:
    """What an `argparse.Namespace` in an official checkpoint unpickles into: a plain attribute bag (DiT's train.py
    stores its arguments as one), so loading them runs no code of argparse's or anyone's."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


# The pickled name of argparse.Namespace, resolved to StoredArguments by the weights-only unpickler.
STORED_ARGUMENTS_NAME = "argparse.Namespace"
# torch's weights-only unpickler names the global (a class or function: code) that a refused pickle needs; its other
# refusals (an unknown opcode, a damaged archive) mean the file is no torch file, their reason after this marker.
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
UNPICKLER_REASON = "WeightsUnpickler error:"


def safe_torch_load(path: str | Path):
    """torch.load restricted to tensors and plain containers; anything needing arbitrary unpickling is refused, and a
    file that is no torch file at all (text, a damaged archive) is called so."""
    try:
        with torch.serialization.safe_globals([(StoredArguments, STORED_ARGUMENTS_NAME)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, OSError, KeyError, ValueError,
            IndexError) as error:
        if isinstance(error, OSError) and not isinstance(error, EOFError):
            raise UserError(f"cannot read {path}: {error.strerror or first_line(error)}; check the path") from None
        needed = UNSAFE_GLOBAL.search(str(error))
        if needed is None:
            reason = str(error).split(UNPICKLER_REASON)[-1].strip().split("\n")[0].split(". ")[0]  # its first sentence
            detail = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
            raise UserError(f"cannot read {path}: it is truncated, damaged or no torch file ({detail}); pass a file "
                            "torch.save wrote, a run folder or a .safetensors file") from None
        raise UserError(f"refusing to load {path}: it needs arbitrary unpickling, which could run code (it names "
                        f"{needed[1]}); convert it to a plain state dict or safetensors") from None
