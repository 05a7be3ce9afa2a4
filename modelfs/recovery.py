"""What the kernel knows of a mount, journaled as it learns it and put back in the next daemon.

`Recorder` writes each inode and handle to the state journal (`state`) before the kernel gets the reply that
makes it known, and compacts the journal as it grows. `Restored` turns a journal into the daemon's tables again:
versions with their attributes and open files, handles with their passthrough backing ids, downloads in flight
restarted with the identity they had. A daemon-path handle reopens its file at its first read and must find the
very version it had (by identity), else it reads EIO; a passthrough handle needs only its backing id.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from . import creads, names
from .errors import Failure
from .fetcher import Fetcher
from .handover import STATE_PREFIX, Holder
from .identity import Identity, settled
from .inodes import OpenFile, Version
from .readers import DownloadReader, LocalReader, Reader, SharedReader
from .resolver import LOCAL, ROUTER, SHARED, Source
from .shared import SharedDir, SharedUnavailable
from .state import Journal, Saved, SavedVersion, StateError
from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

def saved_version(version: Version) -> SavedVersion:
    source = version.source
    return SavedVersion(version.inode, version.path, source.kind, str(source.path), source.size, source.mtime_ns,
                        source.identity, source.trusted)


#: A journal is compacted once it is this big and four times the size of a snapshot.
COMPACT_MIN = 1 << 20


class Recorder:
    """The journal behind `inodes.Recorder` (and the FUSE layer's directory handles); compacts it as it grows."""

    def __init__(self, journal: Journal, holder: Holder, snapshot: Callable[[], Saved]) -> None:
        self.journal = journal
        self.holder = holder
        self.snapshot = snapshot
        self.limit = max(COMPACT_MIN, 4 * journal.length)
        self.broken = False

    def directory(self, inode: int, path: str) -> None:
        self._append({"t": "dir", "i": inode, "p": path})

    def version(self, version: Version) -> None:
        self._append(saved_version(version).record())

    def dropped(self, inode: int) -> None:
        self._append("drop", i=inode)

    def opened(self, fh: int, inode: int, backing_id: int) -> None:
        self._append("open", fh=fh, i=inode, b=backing_id)

    def released(self, fh: int) -> None:
        self._append("close", fh=fh)

    def dir_opened(self, fh: int, inode: int) -> None:
        self._append("dopen", fh=fh, i=inode)

    def dir_released(self, fh: int) -> None:
        self._append("dclose", fh=fh)

    def restarted(self, count: int) -> None:
        self._append("restart", count=count)

    def _append(self, kind: str | dict[str, object], **ints: int) -> None:
        """Journal one record (a dict, or a kind and its integer fields); compact when it has grown."""
        if self.broken:
            return
        try:
            if isinstance(kind, dict):
                self.journal.append(kind)
            else:
                self.journal.append_ints(kind, **ints)
            if self.journal.length > self.limit:
                self.compact()
        except OSError as exc:
            # Serving goes on; only a restart loses: with no state at the holder, the next daemon remounts.
            log.error("the restart journal cannot be written (%s): after a crash the mount will be remounted, "
                      "not resumed", exc)
            self.broken = True
            self.holder.remove(f"{STATE_PREFIX}{self.journal.generation}")

    def compact(self) -> None:
        """Write what is live into a new journal, hand it to the holder, drop the old one."""
        journal = Journal.create(self.journal.generation + 1)
        try:
            journal.extend(self.snapshot().records())
        except OSError:
            journal.close()
            raise
        self.holder.store(f"{STATE_PREFIX}{journal.generation}", journal.fd)
        self.holder.remove(f"{STATE_PREFIX}{self.journal.generation}")
        log.info("restart journal compacted: %d -> %d bytes (generation %d)", self.journal.length, journal.length,
                 journal.generation)
        self.journal.close()
        self.journal = journal
        self.limit = max(COMPACT_MIN, 4 * journal.length)


class RestoredReader:
    """A handle's file from before the restart, opened again at its first read (the kernel reads passthrough
    handles itself: those are never opened). It must be the very version the handle had, else EIO."""

    def __init__(self, source: Source, opener: Callable[[], Awaitable[Reader]]) -> None:
        self.source = source.kind
        self.path = str(source.path)
        self.identity = source.identity or Identity(0, 0, 0, 0)
        self.trusted = source.trusted
        self.complete = source.kind != ROUTER
        self.fd = -1
        self._opener = opener
        self._reader: Reader | None = None
        self._failure: Failure | None = None
        self._lock = trio.Lock()

    async def _get(self) -> Reader:
        async with self._lock:
            if self._reader is None:
                if self._failure is None:
                    try:
                        self._reader = await self._opener()
                        self.fd = self._reader.fd
                    except Failure as exc:
                        log.error("%s", exc)
                        self._failure = exc
                if self._failure is not None:
                    raise self._failure
            assert self._reader is not None
            return self._reader

    async def read(self, offset: int, size: int) -> bytes | memoryview | creads.FileRange:
        return await (await self._get()).read(offset, size)

    def c_read(self) -> None:
        """Restored handles are read in Python (pyfuse3's C reads are registered at open); new opens use C."""
        return None

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await (await self._get()).call(fn, *args)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()


class Restored:
    """A `Saved` state checked against this mount's configuration and turned into the daemon's tables."""

    def __init__(self, saved: Saved, store: Store, shared: list[SharedDir], fetcher: Fetcher | None,
                 drop_cache: bool) -> None:
        self.saved = saved
        self.store = store
        self.shared = shared
        self.fetcher = fetcher
        self.drop_cache = drop_cache
        self.sources = {inode: self._source(v) for inode, v in saved.versions.items()}

    def _source(self, v: SavedVersion) -> Source:
        """The source a saved version stands for; StateError for a file outside the store and shared dirs."""
        name = v.name
        backing = Path(v.backing)
        identity = Identity(*v.identity) if v.identity else None
        if v.kind == SHARED:
            for directory in self.shared:
                if backing in names.candidates(directory.root, name):
                    return Source(SHARED, name, backing, v.size, v.mtime_ns, directory, identity=identity,
                                  trusted=v.trusted)
        elif (v.kind == LOCAL and backing in names.candidates(self.store.root, name)
              or v.kind == ROUTER and backing == self.store.final_path(name)):
            return Source(v.kind, name, backing, v.size, v.mtime_ns, identity=identity, trusted=v.trusted)
        raise StateError(f"inode {v.inode}: {v.kind} file {v.backing!r} is not model {name!r} of this mount's "
                         "store or shared directories")

    def versions(self) -> tuple[list[Version], dict[int, Version]]:
        """The versions, with an open file for those that have handles; and the handles."""
        versions = {inode: Version(inode, v.path, self.sources[inode]) for inode, v in self.saved.versions.items()}
        handles: dict[int, Version] = {}
        for fh, (inode, backing_id) in self.saved.handles.items():
            version = versions[inode]
            if version.file is None:
                source = version.source
                version.file = OpenFile(RestoredReader(source, functools.partial(self._reopen, source)), backing_id)
            version.file.handles += 1
            version.file.backing_id = version.file.backing_id or backing_id
            handles[fh] = version
        return list(versions.values()), handles

    async def _reopen(self, source: Source) -> Reader:
        """The file a restored handle read, found again by its identity; Failure(EIO) if it is gone."""
        name, identity = source.name, source.identity
        gone = Failure(errno.EIO, f"{name}: the file an open handle read ({source.path}) was replaced or removed "
                       "while no daemon served the mount; that handle now reads EIO (a new open reads the model)")
        if identity is None:
            raise gone
        if source.kind == SHARED:
            assert source.shared is not None
            return await self._reopen_shared(source.shared, name, identity, gone)
        found = _open_identical(names.candidates(self.store.root, name), identity)
        if found is not None:
            return LocalReader(found[0], found[1], identity, self.drop_cache)
        download = self.fetcher.downloads.get(name) if self.fetcher and source.kind == ROUTER else None
        if download is not None and _same_file(download.fd, identity):
            fd = os.dup(download.fd)
            try:
                return DownloadReader(fd, str(self.store.partial_path(name)), download, identity, self.drop_cache)
            except BaseException:
                os.close(fd)
                raise
        raise gone

    async def _reopen_shared(self, shared: SharedDir, name: str, identity: Identity, gone: Failure) -> Reader:
        for path in names.candidates(shared.root, name):
            try:
                fd, st = await shared.open(path)
            except SharedUnavailable as exc:
                raise Failure(errno.EIO, f"shared directory {shared.root} unavailable: {exc}") from None
            except OSError:
                continue
            if Identity.of(st) == identity:
                return SharedReader(fd, str(path), shared, identity, settled(identity.mtime_ns), self.drop_cache)
            shared.close_soon(fd)
        raise gone

    def resume_downloads(self) -> None:
        """Start again the downloads restored handles (or the names' current versions) were reading, with the
        identity they had, from the resume record the previous daemon left. Needs the fetcher running."""
        if self.fetcher is None:
            return
        held = {inode for inode, _ in self.saved.handles.values()}
        newest: dict[str, int] = {}
        for inode, v in self.saved.versions.items():
            newest[v.path] = max(newest.get(v.path, 0), inode)
        for inode, source in self.sources.items():
            identity = source.identity
            if source.kind != ROUTER or identity is None or (inode not in held and newest[
                    self.saved.versions[inode].path] != inode):
                continue
            if _stat_same(self.store.final_path(source.name), identity):
                continue  # promoted before the restart
            if not _stat_same(self.store.partial_path(source.name), identity):
                log.info("download of %s cannot resume: its partial file is gone or another", source.name)
                continue
            download = self.fetcher.resume(source.name, identity[2] or None, identity[3])
            log.info("download of %s resumed after the restart (%d bytes on disk)", source.name,
                     os.fstat(download.fd).st_size)


def _same_file(fd: int, identity: Identity) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == identity[:2]


def _stat_same(path: Path, identity: Identity) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity[:2]


def _open_identical(paths: tuple[Path, Path], identity: Identity) -> tuple[int, str] | None:
    """Open whichever of `paths` (in the store) is the file of `identity`; None if neither is."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if Identity.of(os.fstat(fd)) == identity:
            return fd, str(path)
        os.close(fd)
    return None
