"""Name → source: the local store, then each shared directory, then the routers; otherwise ENOENT.

All policy of the namespace lives here: the order of sources, skipping unavailable shared directories, the short
negative cache, what a directory lists, whether an open may keep the kernel's page cache, and which reader serves
an open file. The FUSE layer only asks.
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

from . import layout, names
from .config import Config
from .errors import Failure, not_found
from .fetcher import Download, Fetcher
from .readers import DownloadReader, LocalReader, Reader, SharedReader
from .router import NotFound, Router, RouterError
from .shared import SharedDir, SharedUnavailable
from .store import Store, StoreFull

log = logging.getLogger(__name__)

LOCAL, SHARED, ROUTER = "local", "shared", "router"
STABLE_AFTER_NS = 2_000_000_000


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


class Resolver:
    def __init__(self, config: Config, store: Store, shared: list[SharedDir], router: Router | None,
                 fetcher: Fetcher | None, started_ns: int | None = None) -> None:
        self.store_max_size = config.store_max_size
        self.drop_cache = config.drop_backing_cache
        self.store = store
        self.shared = shared
        self.router = router
        self.fetcher = fetcher
        self.started_ns = started_ns or time.time_ns()
        self._misses: TTLCache[str, str] = TTLCache(maxsize=65536, ttl=config.negative_cache_ttl)
        self._router_list: TTLCache[str, dict[str, int]] = TTLCache(maxsize=1, ttl=config.router_list_ttl)
        # What a HEAD said, so the open right after a lookup does not ask again.
        self._heads: TTLCache[str, int] = TTLCache(maxsize=4096, ttl=config.negative_cache_ttl)
        # Per model: the backing file's identity at the last open, and whether it was old enough to trust.
        self._identities: dict[str, tuple[tuple[int, int, int, int], bool]] = {}
        self._open: dict[str, int] = {}  # open handles per model: those are never evicted

    def _local(self, name: str, found: layout.Found) -> Source:
        return Source(LOCAL, name, found.path, found.st.st_size, found.st.st_mtime_ns)

    async def resolve(self, name: str) -> Source:
        """The source of model `name`, in the order store → shared → router. Never reads model bytes."""
        names.validate(name)
        if name in self._misses:
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
                return Source(SHARED, name, found.path, found.st.st_size, found.st.st_mtime_ns, shared)
            looked.append(f"shared {shared.root}")
        source = await self._remote(name, looked)
        if source is not None:
            return dataclasses.replace(source, skipped=tuple(skipped)) if skipped else source
        message = f"model {name!r} not found; looked in: " + ", ".join(looked)
        if not skipped:  # a directory coming back must show its models at once
            self._misses[name] = message
        log.info("%s", message)
        raise not_found(message)

    async def _remote(self, name: str, looked: list[str]) -> Source | None:
        """A router source for `name` without fetching a byte: a running download, the list, or a HEAD."""
        download = self.fetcher.downloads.get(name) if self.fetcher else None
        if download is not None:
            return self._router_source(name, download.total or 0, download)
        if self.router is None:
            return None
        listed = self._router_list.get("models", {}).get(name, -1)
        if listed > 0:
            return self._router_source(name, listed)
        if name in self._heads:
            return self._router_source(name, self._heads[name])
        try:
            remote = await self.router.head(name)
        except NotFound:
            looked.append("routers " + ", ".join(self.router.urls) + " (404)")
            return None
        except RouterError as exc:
            log.error("cannot resolve %s: no router answered: %s", name, exc)
            raise Failure(errno.EIO, f"no router answered for {name!r}: {exc}") from None
        self._heads[name] = remote.size
        return self._router_source(name, remote.size)

    def _router_source(self, name: str, size: int, download: Download | None = None) -> Source:
        return Source(ROUTER, name, self.store.final_path(name), size, self.started_ns, download=download)

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
        return any(name.startswith(prefix + "/") for name in await self.router_models())

    async def router_models(self) -> dict[str, int]:
        """The routers' model list, cached for `router_list_ttl`; {} when no router answers."""
        if self.router is None:
            return {}
        models = self._router_list.get("models")
        if models is None:
            models = await self.router.list_models()
            self._router_list["models"] = models
        return models

    async def list_models(self) -> dict[str, Source]:
        """Every model visible in the mount; the store wins over shared dirs, which win over routers."""
        models: dict[str, Source] = {}
        for name, size in (await self.router_models()).items():
            models[name] = self._router_source(name, max(size, 0))
        for name, download in (self.fetcher.downloads.items() if self.fetcher else ()):
            models[name] = self._router_source(name, download.total or 0, download)
        for shared in reversed(self.shared):
            try:
                found = await shared.walk()
            except (SharedUnavailable, OSError) as exc:
                log.info("listing skips shared directory %s: %s", shared.root, exc)
                continue
            for name, f in found.items():
                models[name] = Source(SHARED, name, f.path, f.st.st_size, f.st.st_mtime_ns, shared)
        for name, f in (await trio.to_thread.run_sync(self.store.walk)).items():
            models[name] = self._local(name, f)
        return models

    async def list_dir(self, prefix: str) -> dict[str, Source | None]:
        """Entries of mount directory `prefix`: `<model>.gguf` → its source, subdirectory → None."""
        entries: dict[str, Source | None] = {}
        start = prefix + "/" if prefix else ""
        for name, source in (await self.list_models()).items():
            if not name.startswith(start):
                continue
            rest = name[len(start):]
            head, slash, _ = rest.partition("/")
            if slash:
                entries.setdefault(head, None)
            else:
                entries[rest + names.SUFFIX] = source
        return entries

    async def open(self, name: str) -> tuple[Reader, bool]:
        """A reader for model `name`, and whether the kernel may keep its cached pages (file unchanged)."""
        reader, keep_cache = await self._open_source(name)
        self._open[name] = self._open.get(name, 0) + 1
        return reader, keep_cache

    async def close(self, name: str, reader: Reader) -> None:
        count = self._open.get(name, 1) - 1
        if count:
            self._open[name] = count
        else:
            self._open.pop(name, None)
        await reader.close()

    async def _open_source(self, name: str) -> tuple[Reader, bool]:
        source = await self.resolve(name)
        reader: Reader
        if source.kind == LOCAL:
            fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            reader = LocalReader(fd, str(source.path), self.drop_cache)
            st = os.fstat(fd)
            self.store.touch(name)
        elif source.kind == SHARED:
            assert source.shared is not None
            try:
                fd = await source.shared.call(os.open, source.path, os.O_RDONLY | os.O_CLOEXEC)
                reader = SharedReader(fd, str(source.path), source.shared, self.drop_cache)
                st = await source.shared.call(os.fstat, fd)
            except SharedUnavailable:
                # The directory died between lookup and open: resolve again, which now skips it.
                return await self._open_source(name)
        else:
            assert self.fetcher is not None
            if source.download is None and self.store_max_size and source.size:
                self._make_room(name, source.size)
            download = self.fetcher.start(name, source.size or None)
            joining = source.download is not None
            log.info("open %s: %s download from router into %s%s", name,
                     "joining the" if joining else "starting a", self.store.final_path(name),
                     f" (fallback: {'; '.join(source.skipped)})" if source.skipped else "")
            reader = DownloadReader(os.dup(download.fd), str(self.store.partial_path(name)), download,
                                    self.drop_cache)
            # Pages the kernel cached while this download ran are its bytes: keep them for those who join it.
            return reader, joining
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        keep_cache = self._identities.get(name) == (identity, True)
        if self.fetcher is not None and name in self.fetcher.completed:
            # Downloaded by this daemon: every page the kernel cached came from this very file.
            self.fetcher.completed.discard(name)
            keep_cache = source.kind == LOCAL
        # A shared file changed within the last seconds may change again without its identity showing it (network
        # filesystems with whole-second mtimes and path-based inode numbers, like sshfs): trust it only once it
        # has been left alone for longer than any mtime granularity ("racily clean", as git calls it). The store
        # is a local filesystem with nanosecond mtimes and real inode numbers.
        settled = source.kind == LOCAL or time.time_ns() - st.st_mtime_ns > STABLE_AFTER_NS
        self._identities[name] = (identity, settled)
        log.info("open %s: %s %s%s", name, source.kind, source.path, "" if keep_cache else " (page cache renewed)")
        return reader, keep_cache

    def _make_room(self, name: str, size: int) -> None:
        assert self.store_max_size and self.fetcher is not None
        busy = set(self._open) | set(self.fetcher.downloads) | {name}
        try:
            self.store.make_room(size, self.store_max_size, busy)
        except StoreFull as exc:
            log.error("cannot download %s (%d bytes): %s", name, size, exc)
            raise Failure(errno.ENOSPC, str(exc)) from None

    async def progress(self, name: str) -> str:
        """A model's download state, for the `user.modelfs.progress` xattr and `modelfs status`."""
        download = self.fetcher.downloads.get(name) if self.fetcher else None
        if download is not None and download.error is not None:
            return f"failed: {download.error}"
        if download is not None:
            total = download.total or 0
            percent = f"{100 * download.progress / total:.1f}% " if total else ""
            flight = len(download.in_flight())
            parts = f", {flight} parts in flight" if flight > 1 else ""
            return (f"downloading {percent}({download.progress}/{total or '?'} bytes) at "
                    f"{download.rate() / 1e6:.1f} MB/s{parts}")
        source = await self.resolve(name)
        if source.kind != ROUTER:
            return "complete"
        failure = self.fetcher.failures.get(name) if self.fetcher else None
        if failure:
            return f"failed: {failure}"
        try:
            return f"partial {self.store.partial_path(name).stat().st_size}/{source.size} bytes"
        except OSError:
            return "not downloaded"

    def status(self) -> dict[str, object]:
        """The daemon's state, for the root's `user.modelfs.status` xattr (JSON) and `modelfs status`."""
        downloads = self.fetcher.downloads if self.fetcher else {}
        return {
            "store": {"path": str(self.store.root), "usage_bytes": self.store.usage(),
                      "max_bytes": self.store_max_size},
            "shared": [{"path": str(d.root), "available": d.available, "reason": d.reason} for d in self.shared],
            "routers": [{"url": r.url, "last_status": r.last_status, "last_time": r.last_time}
                        for r in (self.router.states.values() if self.router else ())],
            # parts: [start, next byte, end] of each ranged GET in flight (end -1: size unknown)
            "downloads": {name: {"bytes": d.progress, "total": d.total, "rate": d.rate(), "parts": d.in_flight()}
                          for name, d in downloads.items()},
            "failures": dict(self.fetcher.failures) if self.fetcher else {},
            "open": dict(self._open),
        }
