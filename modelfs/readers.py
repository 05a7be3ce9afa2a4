"""Open model files: how the bytes of each kind of source are read.

A local file is read with `pread` right on the trio loop (page-cache reads of a local disk take microseconds, and
a thread hop would cost more than the read). A shared file is read in a worker thread with a timeout, because its
server may hang. A downloading file is read from the partial file once the download has written the bytes asked
for, waiting only for those bytes.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol

from .errors import Failure
from .fetcher import Download
from .shared import SharedDir, SharedUnavailable


class Reader(Protocol):
    source: str
    path: str

    async def read(self, offset: int, size: int) -> bytes: ...

    async def close(self) -> None: ...


class LocalReader:
    source = "local"

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    async def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    async def close(self) -> None:
        os.close(self.fd)


class SharedReader:
    source = "shared"

    def __init__(self, fd: int, path: str, shared: SharedDir) -> None:
        self.fd = fd
        self.path = path
        self.shared = shared

    async def read(self, offset: int, size: int) -> bytes:
        try:
            return await self.shared.call(os.pread, self.fd, size, offset)
        except SharedUnavailable as exc:
            raise Failure(errno.EIO, f"shared directory {self.shared.root} unavailable: {exc}") from None

    async def close(self) -> None:
        await self.shared.close(self.fd)


class DownloadReader:
    source = "router"

    def __init__(self, fd: int, path: str, download: Download) -> None:
        self.fd = fd
        self.path = path
        self.download = download

    async def read(self, offset: int, size: int) -> bytes:
        end = offset + size
        total = self.download.total
        if total is not None:
            end = min(end, total)
        if end > offset:
            await self.download.wait_for(end)
        return os.pread(self.fd, size, offset)

    async def close(self) -> None:
        os.close(self.fd)
