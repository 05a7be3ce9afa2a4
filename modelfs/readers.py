"""Open model files: how the bytes of each kind of source are read.

A local file is read right on the trio loop (page-cache reads of a local disk take microseconds, and a thread hop
would cost more than the read): by the patched pyfuse3 in C where it can (`c_read`, see `creads`), else with
`pread`. A shared file is read in a worker thread with a timeout, because its server may hang. A downloading file
is read from the partial file once the download has written the bytes asked for, waiting only for those bytes;
the reply is then made by pyfuse3 from the partial file (`creads.file_range`), else from a `pread`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Protocol, TypeVar

from . import creads
from .errors import Failure
from .fetcher import Download
from .identity import Identity
from .shared import SharedDir, SharedUnavailable

T = TypeVar("T")


class Reader(Protocol):
    source: str
    path: str
    fd: int
    identity: Identity  # of the file this reader reads, from `fstat` of its own descriptor
    trusted: bool  # whether `identity` proves the file (not a shared file changed in the last seconds)
    complete: bool  # the whole file is on disk: the kernel may read it itself (passthrough)

    async def read(self, offset: int, size: int) -> bytes | memoryview | creads.FileRange: ...

    def c_read(self) -> tuple[int, int] | None:
        """(fd, drop-behind bytes) if the patched pyfuse3 may answer this file's reads in C, else None.

        Only a complete file on a local disk: those reads run on the trio loop, so never a shared file.
        """
        ...

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking call on this reader's file where that is safe (a worker thread for shared files)."""
        ...

    async def close(self) -> None: ...


_buffer = bytearray(1 << 20)


def pread_shared(fd: int, size: int, offset: int) -> memoryview:
    """`pread` into one buffer reused by every read on the trio loop.

    A fresh 1 MiB bytes object per read costs an mmap and 256 page faults; reusing one buffer is safe because
    pyfuse3 copies the result into its reply before the loop can run another task (no await in between).
    """
    global _buffer
    if size > len(_buffer):
        _buffer = bytearray(size)
    view = memoryview(_buffer)
    return view[: os.preadv(fd, [view[:size]], offset)]


#: Backing pages this far behind the reader are dropped (the kernel has them in the mount's own page cache by then).
DROP_LAG = 16 << 20


class BackingCache:
    """Drops the backing file's pages once they are served, so a model is cached once (in the mount), not twice.

    Dropping the range just served frees nothing (the pages are still referenced then); a lag of a few MiB
    behind the furthest offset read, plus what this handle read at close, does.
    """

    def __init__(self, fd: int, enabled: bool) -> None:
        self.fd = fd
        self.enabled = enabled
        self.start = -1  # the range this handle has read: [start, end)
        self.end = 0
        self.dropped = 0  # pages before this offset were dropped

    def served(self, offset: int, end: int) -> None:
        if not self.enabled:
            return
        if self.start < 0:
            self.start = self.dropped = offset
        self.start = min(self.start, offset)
        self.end = max(self.end, end)
        upto = self.end - DROP_LAG
        if upto - self.dropped >= DROP_LAG:
            os.posix_fadvise(self.fd, self.dropped, upto - self.dropped, os.POSIX_FADV_DONTNEED)
            self.dropped = upto

    def close(self) -> None:
        if self.enabled and self.start >= 0:
            os.posix_fadvise(self.fd, self.start, self.end - self.start, os.POSIX_FADV_DONTNEED)


class LocalReader:
    source = "local"
    complete = True

    def __init__(self, fd: int, path: str, identity: Identity, drop_cache: bool = True) -> None:
        self.fd = fd
        self.path = path
        self.identity = identity
        self.trusted = True  # a local filesystem: nanosecond mtimes and real inode numbers
        self.cache = BackingCache(fd, drop_cache)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)

    async def read(self, offset: int, size: int) -> memoryview:
        data = pread_shared(self.fd, size, offset)
        self.cache.served(offset, offset + len(data))
        return data

    def c_read(self) -> tuple[int, int]:
        return self.fd, DROP_LAG if self.cache.enabled else 0

    async def close(self) -> None:
        self.cache.close()
        os.close(self.fd)


class SharedReader:
    source = "shared"
    complete = True

    def __init__(self, fd: int, path: str, shared: SharedDir, identity: Identity, trusted: bool,
                 drop_cache: bool = True) -> None:
        self.fd = fd
        self.path = path
        self.shared = shared
        self.identity = identity
        self.trusted = trusted
        self.cache = BackingCache(fd, drop_cache)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await self.shared.call(fn, *args)
        except SharedUnavailable as exc:
            raise Failure(errno.EIO, f"shared directory {self.shared.root} unavailable: {exc}") from None

    def _pread(self, size: int, offset: int) -> bytes:
        """Runs in a worker thread: even dropping pages may block on a hung network filesystem."""
        data = os.pread(self.fd, size, offset)
        self.cache.served(offset, offset + len(data))
        return data

    def c_read(self) -> None:
        return None  # a hung server would block the loop: reads stay in worker threads

    async def read(self, offset: int, size: int) -> bytes:
        try:
            return await self.shared.call(self._pread, size, offset)
        except SharedUnavailable as exc:
            raise Failure(errno.EIO, f"shared directory {self.shared.root} unavailable: {exc}") from None

    async def close(self) -> None:
        await self.shared.close(self.fd, before=self.cache.close)


class DownloadReader:
    """Streams a download in progress; the kernel cannot read a file still being written, so never passthrough."""

    source = "router"
    complete = False

    def __init__(self, fd: int, path: str, download: Download, identity: Identity, drop_cache: bool = True) -> None:
        self.fd = fd
        self.path = path
        self.download = download
        self.identity = identity  # the one the promoted file will have (the partial file is renamed, never copied)
        self.trusted = True
        self.cache = BackingCache(fd, drop_cache)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)

    async def read(self, offset: int, size: int) -> memoryview | creads.FileRange:
        end = offset + size
        total = self.download.total
        if total is not None:
            end = min(end, total)
        if end > offset:
            await self.download.wait_for(offset, end)
        if total is not None and end > offset:
            # Bytes [offset, end) are on disk: pyfuse3 replies with them from this version's own descriptor.
            reply = creads.file_range(self.fd, offset, end - offset)
            if reply is not None:
                self._served(offset, end)
                return reply
        data = pread_shared(self.fd, size, offset)  # of a body of unknown size, the file ends where the body did
        self._served(offset, offset + len(data))
        return data

    def _served(self, offset: int, end: int) -> None:
        if self.download.done:  # pages of a file still being written are dirty: nothing to drop yet
            self.cache.served(offset, end)

    def c_read(self) -> None:
        return None  # its reads wait for the download; a handle keeps this reader after it completes

    async def close(self) -> None:
        self.cache.close()
        os.close(self.fd)
