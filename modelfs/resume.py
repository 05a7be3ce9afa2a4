"""The resume record of a partial download: which version of the model the partial file holds, and which byte
ranges of it are on disk, kept in the store's sidecar so that a restart (even after kill -9) fetches only the rest.

Data first, record second: the ranges are taken, the file is fdatasync'ed, then the record is replaced atomically,
so a record never claims a byte a power cut could lose. One lock orders every change of the record with the
truncation of a restart, so the two never interleave.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from .ranged import Version
from .ranges import RangeSet
from .store import Store

log = logging.getLogger(__name__)


class ResumeRecord:
    """The record of one model's partial file `fd`; thread-safe (download threads share it)."""

    def __init__(self, store: Store, name: str, fd: int) -> None:
        self._store = store
        self._name = name
        self._fd = fd
        self._lock = threading.Lock()
        self._version: Version | None = None

    @property
    def version(self) -> Version | None:
        """The version the partial file holds; None while nothing of any version is kept. A `Version` is
        immutable and replaced whole under the lock, so reading it needs none (a GET must not wait on an
        fdatasync)."""
        return self._version

    def load(self) -> tuple[Version | None, RangeSet]:
        """The recorded version and the ranges on disk. A partial file without a record is worthless: emptied."""
        data = self._store.read_sidecar(self._name)
        size = os.fstat(self._fd).st_size
        with self._lock:
            if not data:
                if size:
                    log.info("download of %s: partial download without a record; starting from byte 0", self._name)
                    os.ftruncate(self._fd, 0)
                self._version = None
                return None, RangeSet()
            self._version = version_of(data)
            return self._version, ranges_of(data, size)

    def begin(self, version: Version, keep: RangeSet | None = None) -> None:
        """A version's bytes start here: record it, with the ranges kept of it (none for a new version)."""
        with self._lock:
            self._version = version
            self._write(keep or RangeSet())

    def save(self, snapshot: Callable[[], RangeSet]) -> None:
        """Record the ranges `snapshot()` says are on disk, once they are (fdatasync after the snapshot). The
        snapshot is taken under the lock, so it is never of another version than the one recorded. Logs, never
        raises: a download goes on without its record; a crash would then refetch more."""
        with self._lock:
            if self._version is None:
                return
            ranges = snapshot()
            try:
                os.fdatasync(self._fd)
                self._write(ranges)
            except OSError as exc:
                log.warning("download of %s: cannot record progress for resume: %s", self._name, exc)

    def restart(self, why: str | None) -> None:
        """Forget every byte: empty the file and drop the record (a new version, or bytes of unknown version)."""
        with self._lock:
            if why:
                log.info("download of %s: %s; starting from byte 0", self._name, why)
            os.ftruncate(self._fd, 0)
            self._store.discard_sidecar(self._name)
            self._version = None

    def _write(self, ranges: RangeSet) -> None:
        assert self._version is not None
        self._store.write_sidecar(self._name, as_json(self._version, ranges))


def as_json(version: Version, ranges: RangeSet) -> dict[str, Any]:
    return {"total": version.total, "validator": version.validator, "digest": version.digest,
            "ranges": [[start, end] for start, end in ranges]}


def version_of(data: dict[str, Any]) -> Version:
    total, validator, digest = data.get("total"), data.get("validator"), data.get("digest")
    return Version(total if isinstance(total, int) and total >= 0 else None,
                   validator if isinstance(validator, str) and validator else None,
                   digest if isinstance(digest, str) and digest else None)


def ranges_of(data: dict[str, Any], size: int) -> RangeSet:
    """The recorded ranges, cut to the file's size. A record of a single-stream modelfs has none: its file grew in
    order, so what is there is the prefix. Anything malformed counts as nothing kept."""
    recorded = data.get("ranges")
    if recorded is None:
        return RangeSet([(0, size)])
    try:
        return RangeSet((max(int(s), 0), min(int(e), size)) for s, e in recorded)
    except (TypeError, ValueError):
        return RangeSet()
