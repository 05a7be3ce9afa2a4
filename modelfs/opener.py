"""Opening a model: the file that is the name's model now, opened, and its reader built complete.

The resolver says which source; the opener opens it (a store file on the loop, a shared file in one worker-thread
call that also `fstat`s it, a router model by starting or joining its download) and builds the reader with the
identity `fstat` gave of that very descriptor, so a reader names what it reads even if the name changed since it
was resolved. No descriptor is lost: whatever fails after an open closes it. A file that vanished, or a shared
directory that died, between resolving and opening sends the open to the name's next source.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from . import metrics
from .errors import Failure
from .fetcher import Fetcher
from .identity import Identity, settled
from .quota import Quota
from .readers import DownloadReader, LocalReader, Reader, SharedReader
from .resolver import LOCAL, ROUTER, SHARED, Resolver, Source, download_identity
from .shared import SharedUnavailable

log = logging.getLogger(__name__)

#: How many times an open resolves the name again when its file went away between resolving and opening.
RETRIES = 2


class Opener:
    """Opens model files for `inodes`; one download start (and eviction decision) at a time."""

    def __init__(self, resolver: Resolver, quota: Quota, drop_cache: bool) -> None:
        self.resolver = resolver
        self.store = resolver.store
        self.fetcher: Fetcher | None = resolver.fetcher
        self.quota = quota
        self.drop_cache = drop_cache
        self._starting = trio.Lock()

    async def open(self, name: str, in_use: Callable[[], set[str]]) -> Reader:
        """A reader of the file that is model `name` now, starting its download if needed. `in_use` tells which
        models have open files: they are never evicted to make room for a download."""
        for attempt in range(RETRIES + 1):
            source = await self.resolver.resolve(name)
            try:
                if source.kind == LOCAL:
                    reader: Reader = self._open_local(source)
                elif source.kind == SHARED:
                    reader = await self._open_shared(source)
                else:
                    reader = await self._open_download(source, in_use)
            except (FileNotFoundError, SharedUnavailable) as exc:
                if attempt == RETRIES:
                    if isinstance(exc, SharedUnavailable):
                        raise Failure(errno.EIO, f"{name}: shared directory unavailable: {exc}") from None
                    raise
                log.info("open %s: %s went away before it was opened (%s); resolving it again", name, source.path,
                         exc)
                continue
            metrics.OPENS.labels(source=source.kind).inc()
            return reader
        raise AssertionError("unreachable")

    def _open_local(self, source: Source) -> LocalReader:
        fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            reader = LocalReader(fd, str(source.path), Identity.of(os.fstat(fd)), self.drop_cache)
        except BaseException:
            os.close(fd)
            raise
        self.store.touch(source.name)
        return reader

    async def _open_shared(self, source: Source) -> SharedReader:
        assert source.shared is not None
        fd, st = await source.shared.open(source.path)
        return SharedReader(fd, str(source.path), source.shared, Identity.of(st), settled(st.st_mtime_ns),
                            self.drop_cache)

    async def _open_download(self, source: Source, in_use: Callable[[], set[str]]) -> DownloadReader:
        assert source.kind == ROUTER and self.fetcher is not None
        name = source.name
        async with self._starting:
            running = self.fetcher.downloads.get(name)
            joining = running is not None and not (running.done and running.error)  # a failed one is on its way out
            if not joining:
                await self.quota.reserve(name, source.size, in_use())
            download = self.fetcher.start(name, source.size or None)
        log.info("open %s: %s download from router into %s%s", name, "joining the" if joining else "starting a",
                 self.store.final_path(name),
                 f" (fallback: {'; '.join(source.skipped)})" if source.skipped else "")
        fd = os.dup(download.fd)
        try:
            identity = download_identity(download, source.size)
            return DownloadReader(fd, str(self.store.partial_path(name)), download, identity, self.drop_cache)
        except BaseException:
            os.close(fd)
            raise
