"""FUSE inodes and open files: one inode per directory path, one per *version* of a model file.

The kernel keys its page cache, and with passthrough its backing file, by inode. If two versions of a model
shared an inode, a reader of the old one could get pages of the new one. So a model file's inode stands for one
identity of its backing file (device, inode, size, mtime): a replaced file gets a new inode at the next lookup,
and handles opened before keep the old inode, its pages and its file. Every handle of one inode shares one open
file (`OpenFile`): all of them read the same bytes by construction, and the kernel's rule of one backing file
(and one I/O mode) per inode holds. An open that reaches an inode whose version is no longer the name's file (a
dentry the kernel cached for up to ENTRY_TIMEOUT) fails with ESTALE; the kernel then looks the name up again
(LOOKUP_REVAL) and opens the new inode, so the opener never notices.

Cost: one small record per inode the kernel knows. Versions the kernel has forgotten and nobody holds open are
dropped; each name keeps at most its newest version beyond that.

Every inode and handle the kernel is about to learn of is told to a `Recorder` first (the restart journal, see
`state`), and `restore` builds the tables again from it in a new daemon serving the same connection.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from dataclasses import dataclass
from typing import Protocol

import pyfuse3
import trio

from . import metrics
from .errors import Failure
from .opener import Opener
from .passthrough import Passthrough
from .readers import Reader
from .resolver import Resolver, Source

log = logging.getLogger(__name__)

#: The lookup count of a version restored after a restart: the kernel's real count was not saved (a write per
#: lookup would cost more than it saves), so restored versions are never dropped by forgets, only at unmount.
RESTORED_LOOKUPS = 1 << 60


@dataclass(eq=False)
class OpenFile:
    """The one open backing file every handle of a version reads."""

    reader: Reader
    backing_id: int = 0  # registered with the kernel for passthrough; 0: the daemon serves reads
    fallback: str = ""  # why the daemon serves it although passthrough is active ("" if by design)
    handles: int = 0

    @property
    def io(self) -> str:
        """What `user.modelfs.io` says: `passthrough`, `daemon`, or `daemon (why)` for a fallback."""
        if self.backing_id:
            return "passthrough"
        return f"daemon ({self.fallback})" if self.fallback else "daemon"


@dataclass(eq=False, slots=True)
class Version:
    """One inode of a model file: a name bound to one identity of its file."""

    inode: int
    path: str  # in the mount, e.g. "org/model.gguf"
    source: Source  # what lookup saw: attributes the kernel has, and the identity they belong to
    lookups: int = 0  # the kernel's references (lookup and readdirplus replies minus forgets)
    file: OpenFile | None = None
    _lock: trio.Lock | None = None  # made at the first open: most inodes are only ever looked up or listed

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def lock(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    def same_file(self, source: Source) -> bool:
        """Whether `source` is provably this version's file, so that its handles and pages may be shared."""
        if source.identity is None:  # a router model not downloading: no file yet, so no pages to be wrong
            return self.source.identity is None and self.source.size == source.size
        return source.identity == self.source.identity and (self.source.trusted or self.file is None)


class Recorder(Protocol):
    """Where inodes and handles are recorded before the kernel learns them, so a new daemon can restore them."""

    def directory(self, inode: int, path: str) -> None: ...
    def version(self, version: Version) -> None: ...
    def dropped(self, inode: int) -> None: ...
    def opened(self, fh: int, inode: int, backing_id: int) -> None: ...
    def released(self, fh: int) -> None: ...
    def dir_opened(self, fh: int, inode: int) -> None: ...
    def dir_released(self, fh: int) -> None: ...


class NoRecorder:
    def directory(self, inode: int, path: str) -> None:
        pass

    def version(self, version: Version) -> None:
        pass

    def dropped(self, inode: int) -> None:
        pass

    def opened(self, fh: int, inode: int, backing_id: int) -> None:
        pass

    def released(self, fh: int) -> None:
        pass

    def dir_opened(self, fh: int, inode: int) -> None:
        pass

    def dir_released(self, fh: int) -> None:
        pass


class Inodes:
    """Inode numbers (never reused while mounted), lookup counts, and the open file behind each version."""

    def __init__(self, resolver: Resolver, opener: Opener, passthrough: Passthrough) -> None:
        self.resolver = resolver
        self.opener = opener
        self.passthrough = passthrough
        self.recorder: Recorder = NoRecorder()
        self._dirs: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self._dir_paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self._versions: dict[int, Version] = {}
        self._current: dict[str, Version] = {}  # mount path -> its newest version
        self._handles: dict[int, Version] = {}  # file handle -> the version it reads
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._next_fh = 1

    def _new_inode(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode

    # Inodes.

    def directory(self, path: str) -> int:
        inode = self._dirs.get(path)
        if inode is None:
            inode = self._dirs[path] = self._new_inode()
            self._dir_paths[inode] = path
            self.recorder.directory(inode, path)
        return inode

    def dir_path(self, inode: int) -> str | None:
        return self._dir_paths.get(inode)

    def version(self, inode: int) -> Version | None:
        return self._versions.get(inode)

    def entry(self, path: str, source: Source) -> Version:
        """The inode to show for `path` now that its file is `source`; a new one if the file changed."""
        current = self._current.get(path)
        # A file whose identity proves nothing yet (changed in the last seconds) gets a fresh inode at every lookup,
        # which the kernel does not cache (fs: timeouts 0): no two lookups, so no two openers, ever meet on it, and
        # the one retry the kernel makes after an ESTALE always lands on an inode nobody else can have opened.
        if current is not None and source.trusted and current.same_file(source):
            # The same file, maybe by another route (a finished download is now in the store). Only an open that
            # dropped the inode's pages may make it trusted (`_adopt`).
            before = current.source
            current.source = dataclasses.replace(source, trusted=before.trusted)
            if (before.kind, before.path, before.identity) != (source.kind, source.path, source.identity):
                self.recorder.version(current)
            return current
        version = Version(self._new_inode(), path, source)
        self.recorder.version(version)
        self._versions[version.inode] = version
        self._current[path] = version
        if current is not None:
            log.debug("%s: new version, inode %d (was %d)", path, version.inode, current.inode)
            self._drop_if_unused(current)
        return version

    def forget(self, inode: int, count: int) -> None:
        version = self._versions.get(inode)
        if version is not None:
            version.lookups -= count
            self._drop_if_unused(version)

    def _drop_if_unused(self, version: Version) -> None:
        if version.lookups <= 0 and version.file is None and self._current.get(version.path) is not version:
            del self._versions[version.inode]
            self.recorder.dropped(version.inode)

    def counts(self) -> dict[str, int]:
        """For status: how many inodes and open files the daemon holds."""
        return {"directories": len(self._dirs), "versions": len(self._versions),
                "open_files": sum(1 for v in self._versions.values() if v.file is not None),
                "handles": len(self._handles)}

    def open_counts(self) -> dict[str, int]:
        """Open handles per model (over all its versions), for status."""
        counts: dict[str, int] = {}
        for version in self._versions.values():
            if version.file is not None:
                counts[version.name] = counts.get(version.name, 0) + version.file.handles
        return counts

    def open_names(self) -> set[str]:
        """Models with open files: never evicted from the store."""
        return {version.name for version in self._versions.values() if version.file is not None}

    # Open files.

    async def open(self, version: Version) -> tuple[int, OpenFile, bool]:
        """A new handle on `version`: (fh, its open file, whether the kernel may keep the inode's cached pages)."""
        async with version.lock:
            file = version.file
            if file is not None:
                # Handles are open: share their file if the name still is it, else send the opener to the new one.
                if not version.same_file(await self.resolver.resolve(version.name)):
                    raise self._stale(version)
                keep_cache = True
            else:
                reader = await self.opener.open(version.name, self.open_names)
                try:
                    keep_cache = self._adopt(version, reader)
                    file = OpenFile(reader, *await self.passthrough.register(reader))
                except BaseException:
                    await reader.close()
                    raise
                version.file = file
                if file.backing_id:
                    metrics.PASSTHROUGH_OPENS.inc()
                log.info("open %s: %s %s (inode %d, %s)", version.name, reader.source, reader.path, version.inode,
                         "passthrough" if file.backing_id else "page cache kept" if keep_cache
                         else "page cache renewed")
            file.handles += 1
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = version
            self.recorder.opened(fh, version.inode, file.backing_id)
            # The kernel refuses FOPEN_KEEP_CACHE with passthrough; its page cache is the backing file's then.
            return fh, file, keep_cache and not file.backing_id

    def _adopt(self, version: Version, reader: Reader) -> bool:
        """Bind a version without open handles to the file just opened for it; whether its cached pages hold.

        The same file: its pages are this file's if its identity proved it. Another file of the same size while
        this is the name's newest inode (the file changed between lookup and open, or a router model's download
        began): the kernel's attributes still hold, so adopt it and drop the pages. Otherwise ESTALE.
        """
        proven = version.source.trusted and version.source.identity == reader.identity
        if reader.identity != version.source.identity:
            if self._current.get(version.path) is not version or reader.identity.size != version.source.size:
                raise self._stale(version)
            log.debug("%s: inode %d adopts %s", version.path, version.inode, reader.identity)
        before = version.source
        version.source = dataclasses.replace(before, identity=reader.identity, trusted=reader.trusted,
                                             mtime_ns=reader.identity.mtime_ns)
        if version.source != before:
            self.recorder.version(version)
        return proven

    @staticmethod
    def _stale(version: Version) -> Failure:
        return Failure(errno.ESTALE, f"{version.path}: inode {version.inode} is an older version of the file")

    def handle(self, fh: int) -> OpenFile:
        file = self._handles[fh].file
        assert file is not None
        return file

    async def release(self, fh: int) -> None:
        version = self._handles.pop(fh, None)
        if version is None:  # a release the kernel sent again after a restart, already done before it
            return
        async with version.lock:
            file = version.file
            assert file is not None
            file.handles -= 1
            if file.handles:
                self.recorder.released(fh)
                return
            version.file = None
            if file.backing_id:
                self.passthrough.unregister(file.backing_id)
            try:
                await file.reader.close()
            finally:
                self.recorder.released(fh)  # before the drop: a journal never drops an inode with handles
                self._drop_if_unused(version)

    # Restarts.

    def restore(self, dirs: dict[int, str], versions: list[Version], handles: dict[int, Version],
                next_inode: int, next_fh: int) -> None:
        """Take over the tables of the daemon that served this connection before (see `recovery`).

        `versions` carry their open files (with the number of handles each); a path's newest inode is its current
        version.
        """
        for inode, path in dirs.items():
            self._dirs[path] = inode
            self._dir_paths[inode] = path
        for version in sorted(versions, key=lambda v: v.inode):
            version.lookups = RESTORED_LOOKUPS
            self._versions[version.inode] = version
            self._current[version.path] = version
        self._handles.update(handles)
        self._next_inode = max(self._next_inode, next_inode)
        self._next_fh = max(self._next_fh, next_fh)

    def tables(self) -> tuple[dict[int, str], list[Version], dict[int, tuple[int, int]], int, int]:
        """What `restore` takes, for a compacted journal: directories, versions, handles (fh -> inode and backing
        id), and the next inode and handle numbers."""
        handles = {fh: (version.inode, version.file.backing_id if version.file else 0)
                   for fh, version in self._handles.items()}
        return dict(self._dir_paths), list(self._versions.values()), handles, self._next_inode, self._next_fh
