"""Name → source: the local store, then each shared directory, then the routers; otherwise ENOENT.

The policy of the namespace: the order of sources, skipping unavailable shared directories, the short negative
cache, what a directory lists, and the identity of the file behind a name (which `inodes` turns into one inode per
version). It never opens a model (`opener` does) and fetches no byte; what the routers have comes from `catalog`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import trio
from cachetools import TTLCache

from . import layout, metrics, names
from .catalog import Catalog
from .config import Config
from .errors import Failure, not_found
from .fetcher import Download, Fetcher
from .identity import Identity, settled
from .router import RouterError
from .shared import SharedDir, SharedUnavailable
from .store import Store

log = logging.getLogger(__name__)

LOCAL, SHARED, ROUTER = "local", "shared", "router"


@dataclass(frozen=True)
class Source:
    """Where the bytes of one model come from right now."""

    kind: str
    name: str
    path: Path
    size: int
    mtime_ns: int
    shared: SharedDir | None = None
    download: Download | None = None
    skipped: tuple[str, ...] = ()  # unavailable shared directories passed over on the way here
    #: The file's identity; None for a router model whose download has not begun (there is no file yet).
    identity: Identity | None = None
    #: Whether equal identities prove the same file (false for a shared file changed in the last seconds).
    trusted: bool = True


def download_identity(download: Download, size: int) -> Identity:
    """The identity a downloading model will have once promoted: the partial file is renamed, never copied, and
    gets the download's mtime; so streaming handles and later opens share one inode and its pages."""
    st = os.fstat(download.fd)
    return Identity(st.st_dev, st.st_ino, download.total or size, download.mtime_ns)


class Resolver:
    def __init__(self, config: Config, store: Store, shared: list[SharedDir], catalog: Catalog | None,
                 fetcher: Fetcher | None, started_ns: int | None = None) -> None:
        self.store = store
        self.shared = shared
        self.catalog = catalog
        self.fetcher = fetcher
        self.started_ns = started_ns or time.time_ns()
        self._misses: TTLCache[str, str] = TTLCache(maxsize=65536, ttl=config.negative_cache_ttl)

    def _local(self, name: str, found: layout.Found) -> Source:
        return Source(LOCAL, name, found.path, found.st.st_size, found.st.st_mtime_ns, identity=found.identity)

    def _shared(self, name: str, found: layout.Found, shared: SharedDir) -> Source:
        return Source(SHARED, name, found.path, found.st.st_size, found.st.st_mtime_ns, shared,
                      identity=found.identity, trusted=settled(found.st.st_mtime_ns))

    async def resolve(self, name: str) -> Source:
        """The source of model `name`, in the order store → shared → router. Never reads model bytes."""
        names.validate(name)
        if name in self._misses:
            metrics.MISSES.inc()
            raise not_found(self._misses[name])
        found = self.store.find(name)
        if found is not None:
            return self._local(name, found)
        looked = [f"store {self.store.root}"]
        skipped: list[str] = []
        for shared in self.shared:
            try:
                found = await shared.find(name)
            except SharedUnavailable as exc:
                skipped.append(f"shared {shared.root} (skipped, unavailable: {exc})")
                looked.append(skipped[-1])
                continue
            except OSError as exc:
                looked.append(f"shared {shared.root} ({exc.strerror})")
                continue
            if found is not None:
                return self._shared(name, found, shared)
            looked.append(f"shared {shared.root}")
        source = await self._remote(name, looked)
        if source is not None:
            return dataclasses.replace(source, skipped=tuple(skipped)) if skipped else source
        message = f"model {name!r} not found; looked in: " + ", ".join(looked)
        if not skipped:  # a directory coming back must show its models at once
            self._misses[name] = message
        log.info("%s", message)
        metrics.MISSES.inc()
        raise not_found(message)

    async def _remote(self, name: str, looked: list[str]) -> Source | None:
        """A router source for `name` without fetching a byte: a running download, or the catalog's size (the
        list, or a HEAD); or the store's copy, when a download finished meanwhile."""
        download = self.fetcher.downloads.get(name) if self.fetcher else None
        if download is not None:
            return self._router_source(name, download.total or 0, download)
        # A download that ended while the shared directories were asked is in the store now (it is promoted
        # before it leaves `downloads`): without this second look, the open would download it all over again.
        found = self.store.find(name)
        if found is not None:
            return self._local(name, found)
        if self.catalog is None:
            return None
        try:
            size = await self.catalog.size(name)
        except RouterError as exc:
            log.error("cannot resolve %s: no router answered: %s", name, exc)
            raise Failure(errno.EIO, f"no router answered for {name!r}: {exc}") from None
        if size is None:
            looked.append("routers " + ", ".join(self.catalog.router.urls) + " (404)")
            return None
        return self._router_source(name, size)

    def _router_source(self, name: str, size: int, download: Download | None = None) -> Source:
        if download is None:  # no file yet: the mount's start time, and no identity
            return Source(ROUTER, name, self.store.final_path(name), size, self.started_ns)
        return Source(ROUTER, name, self.store.final_path(name), size, download.mtime_ns, download=download,
                      identity=download_identity(download, size))

    async def is_dir(self, prefix: str) -> bool:
        """Whether `prefix` is a directory of the mount (`org` when `org/model` exists somewhere)."""
        names.validate_dir(prefix)
        if self.store.is_dir(prefix):
            return True
        for shared in self.shared:
            try:
                if await shared.is_dir(prefix):
                    return True
            except (SharedUnavailable, OSError):
                continue
        listed = await self.catalog.listing() if self.catalog else {}
        return any(name.startswith(prefix + "/") for name in listed)

    async def list_dir(self, prefix: str) -> dict[str, Source | None]:
        """Entries of mount directory `prefix`: `<model>.gguf` → its source, subdirectory → None.

        Reads only `prefix` of the store and of each shared directory (one level, see layout.read_level), plus
        the routers' cached list and the running downloads: a listing costs what it lists. The store wins over
        shared directories, which win over routers. A router model listed without a size is sized by HEAD first
        (see catalog); one that cannot be sized is left out.
        """
        entries: dict[str, Source | None] = {}
        start = prefix + "/" if prefix else ""
        level = await trio.to_thread.run_sync(self.store.read_level, prefix)
        for child in level.dirs:
            entries.setdefault(child, None)
        for child, f in level.models.items():
            entries[child + names.SUFFIX] = self._local(names.join(prefix, child), f)
        for shared in self.shared:
            try:
                shared_level = await shared.read_level(prefix)
            except (SharedUnavailable, OSError) as exc:
                log.info("listing of %r skips shared directory %s: %s", prefix, shared.root, exc)
                continue
            for child in shared_level.dirs:
                entries.setdefault(child, None)
            for child, f in shared_level.models.items():
                entries.setdefault(child + names.SUFFIX, self._shared(names.join(prefix, child), f, shared))
        downloads = self.fetcher.downloads if self.fetcher else {}
        for name, download in downloads.items():
            head, slash, _ = name[len(start):].partition("/")
            if name.startswith(start):
                entries.setdefault(head if slash else head + names.SUFFIX,
                                   None if slash else self._router_source(name, download.total or 0, download))
        listed = await self.catalog.listing() if self.catalog else {}
        here: dict[str, int] = {}
        for name, size in listed.items():
            head, slash, _ = name[len(start):].partition("/")
            if not name.startswith(start):
                continue
            if slash:
                entries.setdefault(head, None)
            elif head + names.SUFFIX not in entries:
                here[name] = size
        unsized = [name for name, size in here.items() if size <= 0]
        if unsized and self.catalog is not None:
            here.update(await self.catalog.sized(unsized))
        for name, size in here.items():
            if size > 0:
                entries[name[len(start):] + names.SUFFIX] = self._router_source(name, size)
        return entries
