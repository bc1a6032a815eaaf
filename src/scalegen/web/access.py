"""Who may use the web page, and what it may load: the folders models load from (symlinks and `..` resolved before
the check), and the warning for a page served beyond this machine without a login."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from scalegen.errors import UserError
from scalegen.runs.names import SHIPPED, checkpoint_path


def model_folders(paths: list[str | None]) -> tuple[Path, ...]:
    """The folders a page started with these model paths may load from by default: the shipped models' folder, and
    each model's own folder (a run or export folder itself, the folder holding a checkpoint file); symlinks resolved.
    """
    folders = [SHIPPED.resolve()]
    for path in filter(None, paths):
        resolved = checkpoint_path(path).expanduser().resolve()
        folders.append(resolved if resolved.is_dir() else resolved.parent)
    return tuple(dict.fromkeys(folders))


def named_folders(models_dirs: list[str]) -> tuple[Path, ...]:
    """The folders named by `scalegen serve --models-dir`, symlinks resolved; a one-line error for one that is not a
    folder."""
    folders = tuple(Path(folder).expanduser().resolve() for folder in models_dirs)
    for given, folder in zip(models_dirs, folders):
        if not folder.is_dir():
            raise UserError(f"--models-dir {given} is not a folder: name a folder that holds models")
    return folders


def allowed_model_path(path: str, folders: tuple[Path, ...]) -> Path:
    """A model path typed into the page (a `shipped:` name too), with symlinks and `..` resolved, when it lies inside
    one of `folders`; a one-line error otherwise (the page loads nothing from elsewhere on the server's disk)."""
    resolved = checkpoint_path(path.strip()).expanduser().resolve()
    if not any(resolved.is_relative_to(folder) for folder in folders):
        raise UserError(f"{path.strip()} is outside the folders this page loads models from: start `scalegen serve` "
                        "with --models-dir naming its folder")
    return resolved


def exposure_warning(host: str, auth: list[tuple[str, str]] | None) -> str | None:
    """A warning line for a page served beyond this machine (a host other than a loopback address) without a login;
    None when it is not."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may reach other machines
        loopback = False
    if auth or loopback:
        return None
    return (f"warning: serving on {host} without a login: anyone who reaches this port can generate with the models "
            "and load any under the model folders; give --auth USER:PASSWORD or --auth-file FILE")
