"""A models directory in the llmlb layout (`<dir>/<name>/model.gguf`, or flat `<dir>/<name>.gguf`).

Both the local store and the shared directories are read through these two functions. They block on the
filesystem: the store calls them inline (local disk), shared directories only from worker threads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import names


@dataclass(frozen=True)
class Found:
    """A model file on disk and what `stat` said of it when it was found."""

    path: Path
    st: os.stat_result

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """What must stay equal for cached pages of this file to be still valid."""
        return (self.st.st_dev, self.st.st_ino, self.st.st_size, self.st.st_mtime_ns)


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
