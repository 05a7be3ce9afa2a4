"""The node's local store: the only directory modelfs writes to.

A file at `STORE/<name>/model.gguf` is always complete and verified. A download in progress lives next to it
under hidden names (`.model.gguf.partial` and its `.model.gguf.partial.json` sidecar), which are never listed
or resolved, and becomes a model only by `promote` (fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from . import layout, metrics, names

log = logging.getLogger(__name__)

PARTIAL = ".model.gguf.partial"
SIDECAR = ".model.gguf.partial.json"
#: Marks a model modelfs downloaded (only those may be evicted); its mtime is the model's last use.
DOWNLOADED = ".modelfs-downloaded"


class StoreError(Exception):
    """The store cannot be used (missing, not writable); the message says why."""


class StoreFull(Exception):
    """The store quota cannot make room for a download; the message says how much is pinned."""


class Store:
    """The local store directory, in the llmlb layout."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def check(self) -> None:
        """Create the store if missing and prove it writable, so a mount never starts on a store it can't use."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".modelfs-probe-"):
                pass
        except OSError as exc:
            raise StoreError(f"store {self.root} is not usable: {exc.strerror or exc}") from None

    def find(self, name: str) -> layout.Found | None:
        return layout.locate(self.root, name)

    def is_dir(self, prefix: str) -> bool:
        return layout.is_dir(self.root, prefix)

    def read_level(self, prefix: str) -> layout.Level:
        return layout.read_level(self.root, prefix)

    def final_path(self, name: str) -> Path:
        return self.root / names.validate(name) / names.MODEL_FILE

    def partial_path(self, name: str) -> Path:
        return self.root / names.validate(name) / PARTIAL

    def sidecar_path(self, name: str) -> Path:
        return self.root / names.validate(name) / SIDECAR

    def read_sidecar(self, name: str) -> dict[str, Any]:
        """What the server said when the partial download began (validator, total size); {} if unknown."""
        try:
            data = json.loads(self.sidecar_path(name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_sidecar(self, name: str, data: dict[str, Any]) -> None:
        """Atomically record the validator of a partial download, so a resume never mixes two versions."""
        path = self.sidecar_path(name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def discard_sidecar(self, name: str) -> None:
        self._unlink(self.sidecar_path(name))

    def discard_partial(self, name: str) -> None:
        self._unlink(self.partial_path(name))
        self._unlink(self.sidecar_path(name))

    def _unlink(self, *paths: Path) -> None:
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc.strerror)

    def promote(self, name: str, fd: int, mtime_ns: int) -> Path:
        """Make a verified partial download the model: fsync, atomic rename, fsync the directory.

        The file gets the mtime the mount showed while it downloaded, so the kernel keeps the pages it cached.
        """
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        os.fsync(fd)
        final = self.final_path(name)
        (final.parent / DOWNLOADED).touch()  # before the rename: a model in the store is never without it
        os.replace(self.partial_path(name), final)
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        try:
            self.sidecar_path(name).unlink()
        except FileNotFoundError:
            pass
        return final

    def touch(self, name: str) -> None:
        """Record a use of a downloaded model, for least-recently-used eviction."""
        try:
            os.utime(self.root / names.validate(name) / DOWNLOADED)
        except OSError:
            pass  # not downloaded by modelfs: never evicted, nothing to record

    def downloaded(self) -> list[tuple[float, str, int]]:
        """(last use, name, bytes) of every complete model modelfs downloaded, least recently used first."""
        found = []
        for marker in self.root.rglob(DOWNLOADED):
            model = marker.parent / names.MODEL_FILE
            try:
                name = names.validate(marker.parent.relative_to(self.root).as_posix())
                found.append((marker.stat().st_mtime, name, model.stat().st_blocks * 512))
            except (OSError, names.InvalidName):
                continue
        return sorted(found)

    def evict(self, needed: int, busy: set[str]) -> int:
        """Evict least-recently-used downloaded models not in `busy` until at least `needed` bytes are freed;
        returns the bytes freed. Blocks on the disk (a walk, multi-GB unlinks): call it in a worker thread.

        Never touches models an admin placed by hand (no marker) or partial downloads. Raises StoreFull if even
        evicting everything allowed would not free enough; then nothing is evicted.
        """
        victims: list[tuple[str, int]] = []
        freed = 0
        for _used, name, size in self.downloaded():
            if freed >= needed:
                break
            if name in busy:
                continue
            victims.append((name, size))
            freed += size
        if freed < needed:
            raise StoreFull(f"store {self.root}: {needed} bytes must be freed, only {freed} evictable (models in "
                            "use, placed by hand, or partial)")
        for name, size in victims:
            model_dir = self.root / name
            for path in (model_dir / names.MODEL_FILE, model_dir / DOWNLOADED):
                self._unlink(path)
            log.info("evicted %s (%d bytes, least recently used) to keep store %s under its quota", name, size,
                     self.root)
            metrics.EVICTIONS.inc()
        return freed

    def usage(self) -> int:
        """Bytes of every file in the store: a walk of the whole store, done once per mount (in a thread)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for filename in files:
                try:
                    total += os.stat(os.path.join(dirpath, filename)).st_blocks * 512
                except OSError:
                    pass
        return total

    def model_bytes(self, name: str) -> int:
        """Bytes of the files modelfs writes for model `name`: its model file, partial download, sidecar, marker."""
        directory = self.root / names.validate(name)
        total = 0
        for filename in (names.MODEL_FILE, PARTIAL, SIDECAR, DOWNLOADED):
            try:
                total += os.stat(directory / filename).st_blocks * 512
            except OSError:
                pass
        return total


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
