"""A models directory in the llmlb layout (`<dir>/<name>/model.gguf`, or flat `<dir>/<name>.gguf`).

Both the local store and the shared directories are read through these functions: `locate` (one model),
`read_level` (one directory level, what a listing needs) and `walk` (everything). They block on the filesystem:
the store calls them inline or in a thread (local disk), shared directories only from worker threads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import names
from .identity import Identity


@dataclass(frozen=True)
class Found:
    """A model file on disk and what `stat` said of it when it was found."""

    path: Path
    st: os.stat_result

    @property
    def identity(self) -> Identity:
        return Identity.of(self.st)


def locate(root: Path, name: str) -> Found | None:
    """The file of model `name` under `root`, or None. Refuses symlinks leading outside `root`."""
    for path in names.candidates(root, name):
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            continue
        if not names.inside(root, path):
            continue
        return Found(path, st)
    return None


def is_dir(root: Path, prefix: str) -> bool:
    """Whether `prefix` (e.g. `org`) is a directory under `root` that may hold models."""
    path = root / names.validate(prefix)
    return path.is_dir() and names.inside(root, path)


@dataclass(frozen=True)
class Level:
    """What one directory of a models tree holds: models by entry name (`m` for `m/model.gguf` or `m.gguf`)
    and the subdirectories that may hold more models."""

    models: dict[str, Found]
    dirs: set[str]


def read_level(root: Path, prefix: str) -> Level:
    """The models and subdirectories directly in `root/prefix` ("" is `root`), reading only that directory.

    Each child costs one `lstat` (of `child/model.gguf` for a directory, of itself for a flat file); a child
    directory without `model.gguf` is peeked into (one `getdents`) to tell a prefix directory from one that holds
    only hidden files (a partial download). Symlinks are followed only where they stay inside `root`.
    """
    empty = Level({}, set())
    base = root / names.validate_dir(prefix) if prefix else root
    if prefix and not names.inside(root, base):  # once per listing: a symlinked prefix leading out
        return empty
    try:
        scan = os.scandir(base)
    except (FileNotFoundError, NotADirectoryError):
        return empty
    layout: dict[str, Found] = {}
    flat: dict[str, Found] = {}
    dirs: set[str] = set()
    with scan:
        for entry in scan:
            child = entry.name
            if child.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                if entry.is_symlink() and not names.inside(root, Path(entry.path)):
                    continue
                if is_dir:
                    if not _valid(prefix, child):
                        continue
                    found = _model_file(root, Path(entry.path) / names.MODEL_FILE)
                    if found is not None:
                        layout[child] = found
                    elif _may_hold_models(entry.path):
                        dirs.add(child)
                elif child.endswith(names.SUFFIX) and _valid(prefix, child[: -len(names.SUFFIX)]):
                    found = _model_file(root, Path(entry.path))
                    if found is not None:
                        flat[child[: -len(names.SUFFIX)]] = found
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue  # gone or unreadable since the scan: not a model
    return Level({**flat, **layout}, dirs)  # the llmlb layout wins over a flat file of the same name


def _valid(prefix: str, stem: str) -> bool:
    try:
        names.validate(names.join(prefix, stem))
    except names.InvalidName:
        return False
    return True


def _model_file(root: Path, path: Path) -> Found | None:
    """`path` if it is a non-empty regular file (through a symlink only if that stays inside `root`)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
            if not names.inside(root, path):
                return None
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    return Found(path, st)


def _may_hold_models(path: str) -> bool:
    """Whether a directory has any visible subdirectory or `.gguf` file (stops at the first one)."""
    with os.scandir(path) as scan:
        return any(not e.name.startswith(".") and (e.name.endswith(names.SUFFIX) or e.is_dir()) for e in scan)


def walk(root: Path) -> dict[str, Found]:
    """Every model under `root`, by name; the llmlb layout wins over a flat file of the same name."""
    found: dict[str, Found] = {}
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or not filename.endswith(names.SUFFIX):
                continue
            path = Path(dirpath) / filename
            name = names.name_of_path(root, path)
            if name is None or (name in found and filename != names.MODEL_FILE):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or not names.inside(real_root, path):
                continue
            if name in found and found[name].path.name == names.MODEL_FILE:
                continue
            found[name] = Found(path, st)
    return found
