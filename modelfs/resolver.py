"""Name → source: the local store, then each shared directory, then the routers; otherwise ENOENT.

All policy of the namespace lives here: the order of sources, skipping unavailable shared directories, the short
negative cache, what a directory lists, the identity of the file behind a name (which `inodes` turns into one
inode per version), and which reader serves an open file. The FUSE layer only asks.
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
from .config import Config
from .errors import Failure, not_found
from .fetcher import Download, Fetcher
from .readers import DownloadReader, LocalReader, Reader, SharedReader
from .router import NotFound, Router, RouterError
from .shared import SharedDir, SharedUnavailable
from .store import Store, StoreFull

log = logging.getLogger(__name__)

LOCAL, SHARED, ROUTER = "local", "shared", "router"
#: A shared file changed within this long may change again without its identity showing it (network filesystems
#: with whole-second mtimes and path-based inode numbers, like sshfs): its identity proves nothing until then
#: ("racily clean", as git calls it). The store is a local filesystem with nanosecond mtimes and real inodes.
STABLE_AFTER_NS = 2_000_000_000

#: What must stay equal for two looks at a model to be the same file: device, inode, size, mtime (ns).
Identity = tuple[int, int, int, int]


def settled(mtime_ns: int) -> bool:
    return time.time_ns() - mtime_ns > STABLE_AFTER_NS


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
        # The routers' model list as last fetched (None: never), and when; see router_models.
        self._router_list: dict[str, int] | None = None
        self._router_list_at = float("-inf")
        self._router_list_ttl = config.router_list_ttl
        self._refreshing = False
        # What a HEAD said, so the open right after a lookup does not ask again.
        self._heads: TTLCache[str, int] = TTLCache(maxsize=4096, ttl=config.negative_cache_ttl)
        self._open: dict[str, int] = {}  # open files per model: those are never evicted
        # Store usage for status and metrics: a walk of the whole store (0.5 s at 10,000 models), so not per request.
        self._usage: TTLCache[str, int] = TTLCache(maxsize=1, ttl=2.0)

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
        """A router source for `name` without fetching a byte: a running download, the list, or a HEAD (or the
        store's copy, when a download finished meanwhile)."""
        download = self.fetcher.downloads.get(name) if self.fetcher else None
        if download is not None:
            return self._router_source(name, download.total or 0, download)
        # A download that ended while the shared directories were asked is in the store now (it is promoted
        # before it leaves `downloads`): without this second look, the open would download it all over again.
        found = self.store.find(name)
        if found is not None:
            return self._local(name, found)
        if self.router is None:
            return None
        # The list answers without a request (also when expired: its refresh runs in the background, so a
        # stalled router never holds this lookup). A model the list lacks may be newer than it: HEAD for those.
        listed = self._known_router_models().get(name)
        if listed is not None:
            return self._router_source(name, max(listed, 0))
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
        if download is None:  # no file yet: the mount's start time, and no identity
            return Source(ROUTER, name, self.store.final_path(name), size, self.started_ns)
        return Source(ROUTER, name, self.store.final_path(name), size, download.mtime_ns, download=download,
                      identity=self._download_identity(download, size))

    def _download_identity(self, download: Download, size: int) -> Identity:
        """The identity the model will have once promoted: the partial file is renamed, never copied, and gets
        the download's mtime; so streaming handles and later opens share one inode and its pages."""
        st = os.fstat(download.fd)
        return (st.st_dev, st.st_ino, download.total or size, download.mtime_ns)

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
        """The routers' model list; {} when no router ever answered. Waits only for the very first fetch."""
        if self.router is None:
            return {}
        if self._router_list is None:
            await self._refresh_router_list()
        return self._known_router_models()

    def _known_router_models(self) -> dict[str, int]:
        """The list as last fetched, at once; starts one background refresh once it is `router_list_ttl` old.

        Stale-while-revalidate: a listing or lookup never waits on a slow or stalled router once a list is known;
        at worst it sees a list one refresh old (a model removed since then fails its open with ENOENT).
        """
        if self.router is None:
            return {}
        if time.monotonic() - self._router_list_at >= self._router_list_ttl and not self._refreshing:
            self._refreshing = True
            trio.lowlevel.spawn_system_task(self._refresh_router_list)
        return self._router_list or {}

    async def _refresh_router_list(self) -> None:
        """Fetch the list; on failure keep the old one (or {}) and try again after `router_list_ttl`."""
        assert self.router is not None
        try:
            self._router_list = await self.router.list_models()
        except RouterError as exc:
            log.info("keeping the routers' model list of %s: %s", "before" if self._router_list else "none", exc)
            if self._router_list is None:
                self._router_list = {}
        except Exception as exc:  # a background task must never take the daemon down (e.g. at unmount)
            log.warning("refresh of the routers' model list failed: %r", exc)
        finally:
            self._router_list_at = time.monotonic()
            self._refreshing = False

    async def list_dir(self, prefix: str) -> dict[str, Source | None]:
        """Entries of mount directory `prefix`: `<model>.gguf` → its source, subdirectory → None.

        Reads only `prefix` of the store and of each shared directory (one level, see layout.read_level), plus
        the routers' cached list and the running downloads: a listing costs what it lists. The store wins over
        shared directories, which win over routers.
        """
        entries: dict[str, Source | None] = {}
        start = prefix + "/" if prefix else ""

        def add(name: str, source: Source) -> None:
            head, slash, _ = name[len(start):].partition("/")
            if slash:
                entries.setdefault(head, None)
            else:
                entries[head + names.SUFFIX] = source

        for name, size in (await self.router_models()).items():
            if name.startswith(start):
                add(name, self._router_source(name, max(size, 0)))
        for name, download in (self.fetcher.downloads.items() if self.fetcher else ()):
            if name.startswith(start):
                add(name, self._router_source(name, download.total or 0, download))
        for shared in reversed(self.shared):
            try:
                level = await shared.read_level(prefix)
            except (SharedUnavailable, OSError) as exc:
                log.info("listing of %r skips shared directory %s: %s", prefix, shared.root, exc)
                continue
            for child in level.dirs:
                entries.setdefault(child, None)
            for child, f in level.models.items():
                name = names.join(prefix, child)
                entries[child + names.SUFFIX] = self._shared(name, f, shared)
        level = await trio.to_thread.run_sync(self.store.read_level, prefix)
        for child in level.dirs:
            entries.setdefault(child, None)
        for child, f in level.models.items():
            entries[child + names.SUFFIX] = self._local(names.join(prefix, child), f)
        return entries

    async def describe_dir(self, prefix: str) -> dict[str, object]:
        """One directory for `modelfs status` (the `user.modelfs.entries` xattr): its models with source, size,
        state and backing path, and its subdirectories. One request per directory instead of three per model."""
        models: dict[str, dict[str, object]] = {}
        dirs: list[str] = []
        for entry, source in sorted((await self.list_dir(prefix)).items()):
            if source is None:
                dirs.append(entry)
            else:
                models[source.name] = {"source": source.kind, "size": source.size,
                                       "state": self._state(source), "path": str(source.path)}
        return {"models": models, "dirs": dirs}

    async def open(self, name: str) -> Reader:
        """Open the file that is model `name` now (starting its download if needed); the reader knows its identity.

        The identity comes from `fstat` of the open file, so it names what this reader will read even if the
        name changed since it was resolved.
        """
        reader = await self._open_source(await self.resolve(name))
        self._open[name] = self._open.get(name, 0) + 1
        return reader

    async def close(self, name: str, reader: Reader) -> None:
        count = self._open.get(name, 1) - 1
        if count:
            self._open[name] = count
        else:
            self._open.pop(name, None)
        await reader.close()

    async def _open_source(self, source: Source) -> Reader:
        name = source.name
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
                return await self._open_source(await self.resolve(name))
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
            reader.identity = self._download_identity(download, source.size)
            metrics.OPENS.labels(source=ROUTER).inc()
            return reader
        reader.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        reader.trusted = source.kind == LOCAL or settled(st.st_mtime_ns)
        metrics.OPENS.labels(source=source.kind).inc()
        return reader

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
        if download is not None:
            return _download_state(download)
        return self._state(await self.resolve(name))

    def _state(self, source: Source) -> str:
        """`complete` means in place: a local or shared file, or a download verified and promoted."""
        download = self.fetcher.downloads.get(source.name) if self.fetcher else None
        if download is not None:
            return _download_state(download)
        if source.kind != ROUTER:
            return "complete"
        failure = self.fetcher.failures.get(source.name) if self.fetcher else None
        if failure:
            return f"failed: {failure}"
        try:
            return f"partial {self.store.partial_path(source.name).stat().st_size}/{source.size} bytes"
        except OSError:
            return "not downloaded"

    def store_usage(self) -> int:
        """Bytes used by the store, at most 2 s old (status and metrics; eviction asks the store itself)."""
        usage = self._usage.get("store")
        if usage is None:
            usage = self._usage["store"] = self.store.usage()
        return usage

    def status(self) -> dict[str, object]:
        """The daemon's state, for the root's `user.modelfs.status` xattr (JSON) and `modelfs status`."""
        downloads = self.fetcher.downloads if self.fetcher else {}
        return {
            "store": {"path": str(self.store.root), "usage_bytes": self.store_usage(),
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


def _download_state(download: Download) -> str:
    """`downloading …` while bytes arrive, `verifying …` once all are on disk but not yet promoted."""
    if download.error is not None:
        return f"failed: {download.error}"
    total = download.total or 0
    if total and download.progress >= total:
        return f"verifying ({total} bytes on disk)"
    percent = f"{100 * download.progress / total:.1f}% " if total else ""
    flight = len(download.in_flight())
    parts = f", {flight} parts in flight" if flight > 1 else ""
    return (f"downloading {percent}({download.progress}/{total or '?'} bytes) at "
            f"{download.rate() / 1e6:.1f} MB/s{parts}")
