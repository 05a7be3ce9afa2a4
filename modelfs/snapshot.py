"""What the daemon says about itself through extended attributes: the root's status, each directory's models and
each model's source, I/O path and download state.

Built on the trio loop from the live objects when asked, and only the value asked for: each xattr name has its own
producer, so a root `getxattr` of one name never builds the others (no listing of the root to answer
`user.modelfs.version`). Model states are JSON (see `states`); the tools read those, never the text.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Awaitable, Callable
from typing import Any

from . import __version__, creads
from .errors import DownloadFailed, Failure
from .fetcher import Download
from .inodes import Inodes, Version
from .passthrough import Passthrough
from .quota import Quota
from .resolver import ROUTER, Resolver, Source
from .states import COMPLETE, DOWNLOADING, FAILED, NOT_DOWNLOADED, PARTIAL, VERIFYING, ModelState, describe

#: One xattr's value, computed when it is asked for.
Producer = Callable[[], Awaitable[bytes]]


def download_state(download: Download) -> ModelState:
    """`downloading` while bytes arrive, `verifying` once all are on disk but not yet promoted, `failed`."""
    if download.error is not None:
        return failed(download.error)
    total = download.total
    progress = download.progress
    if total and progress >= total:
        return {"state": VERIFYING, "bytes": total, "total": total}
    return {"state": DOWNLOADING, "bytes": progress, "total": total, "rate": download.rate(),
            "parts": download.in_flight()}


def failed(failure: BaseException | str) -> ModelState:
    err = getattr(failure, "errno", None)
    state: ModelState = {"state": FAILED, "errno": err if isinstance(err, int) else errno.EIO, "reason": str(failure)}
    if isinstance(failure, DownloadFailed):
        state["cause"] = failure.reason.value
    return state


class Status:
    """The daemon's state, for `getfattr` and `modelfs status`/`prefetch`."""

    def __init__(self, resolver: Resolver, quota: Quota, passthrough: Passthrough, inodes: Inodes) -> None:
        self.resolver = resolver
        self.fetcher = resolver.fetcher
        self.quota = quota
        self.passthrough = passthrough
        self.inodes = inodes
        #: The serving process: pid, restarts, what holds its connection (see `handover.lifecycle`).
        self.lifecycle: dict[str, object] = {}

    # Models.

    def model_state(self, source: Source) -> ModelState:
        """`complete` means in place: a local or shared file, or a download verified and promoted."""
        download = self.fetcher.downloads.get(source.name) if self.fetcher else None
        if download is not None:
            return download_state(download)
        if source.kind != ROUTER:
            return {"state": COMPLETE}
        failure = self.fetcher.failures.get(source.name) if self.fetcher else None
        if failure:
            return failed(failure)
        try:
            size = self.resolver.store.partial_path(source.name).stat().st_size
        except OSError:
            return {"state": NOT_DOWNLOADED, "total": source.size}
        return {"state": PARTIAL, "bytes": size, "total": source.size}

    async def state_of(self, name: str) -> ModelState:
        download = self.fetcher.downloads.get(name) if self.fetcher else None
        if download is not None:
            return download_state(download)
        return self.model_state(await self.resolver.resolve(name))

    async def directory(self, prefix: str) -> dict[str, object]:
        """One directory for `modelfs status` (`user.modelfs.entries`): each model in it with source, size, backing
        path and state (the fields of `states.ModelState`), and its subdirectories. One request per directory."""
        models: dict[str, dict[str, object]] = {}
        dirs: list[str] = []
        for entry, source in sorted((await self.resolver.list_dir(prefix)).items()):
            if source is None:
                dirs.append(entry)
            else:
                models[source.name] = {"source": source.kind, "size": source.size, "path": str(source.path),
                                       **self.model_state(source)}
        return {"models": models, "dirs": dirs}

    # The daemon.

    def shared(self) -> list[dict[str, object]]:
        return [{"path": str(d.root), "available": d.available, "reason": d.reason} for d in self.resolver.shared]

    def routers(self) -> list[dict[str, object]]:
        router = self.resolver.catalog.router if self.resolver.catalog else None
        return [{"url": r.url, "last_status": r.last_status, "last_time": r.last_time}
                for r in (router.states.values() if router else ())]

    def passthrough_state(self) -> dict[str, object]:
        return {"mode": self.passthrough.mode, "active": self.passthrough.active, "reason": self.passthrough.reason}

    async def document(self) -> dict[str, object]:
        """Everything at once: the root's `user.modelfs.status`."""
        downloads = self.fetcher.downloads if self.fetcher else {}
        failures = self.fetcher.failures if self.fetcher else {}
        return {
            "version": __version__,
            **self.lifecycle,
            "store": {"path": str(self.resolver.store.root), "usage_bytes": await self.quota.counted(),
                      "max_bytes": self.quota.limit},
            "shared": self.shared(),
            "routers": self.routers(),
            # parts: [start, next byte, end] of each ranged GET in flight (end -1: size unknown)
            "downloads": {name: {"bytes": d.progress, "total": d.total, "rate": d.rate(), "parts": d.in_flight()}
                          for name, d in downloads.items()},
            "failures": {name: failed(failure) for name, failure in failures.items()},
            "open": self.inodes.open_counts(),
            "passthrough": self.passthrough_state(),
            "c_answers": creads.counts(),  # requests the patched pyfuse3 answered in C (daemon path)
            "inodes": self.inodes.counts(),
        }

    # Extended attributes.

    def directory_xattrs(self, path: str) -> dict[str, Producer]:
        """Every directory's `user.modelfs.entries`; on the root also the daemon's state."""
        producers: dict[str, Producer] = {"user.modelfs.entries": lambda: _json(self.directory(path))}
        if path:
            return producers
        return {
            "user.modelfs.version": lambda: _value(__version__),
            "user.modelfs.store_usage": lambda: _json(self.quota.counted()),
            "user.modelfs.shared": lambda: _value(json.dumps(self.shared())),
            "user.modelfs.routers": lambda: _value(json.dumps(self.routers())),
            "user.modelfs.passthrough": lambda: _value(json.dumps(self.passthrough_state())),
            "user.modelfs.status": lambda: _json(self.document()),
            **producers,
        }

    def file_xattrs(self, version: Version) -> dict[str, Producer]:
        async def served() -> tuple[str, str, str]:
            """(source, backing path, I/O path) of what this inode serves: the file its handles read, else its
            file as found now (a finished download is in the store by now), else what lookup saw."""
            file = version.file
            if file is not None:
                return file.reader.source, file.reader.path, file.io
            source = version.source
            try:
                now = await self.resolver.resolve(version.name)
                source = now if version.same_file(now) else source
            except Failure:
                pass
            io = self.passthrough.expected_io(source.identity.dev if source.identity else None, source.kind != ROUTER)
            return source.kind, str(source.path), io

        async def field(index: int) -> bytes:
            return (await served())[index].encode()

        async def progress() -> bytes:
            return describe(await self.state_of(version.name)).encode()

        return {"user.modelfs.source": lambda: field(0), "user.modelfs.path": lambda: field(1),
                "user.modelfs.io": lambda: field(2), "user.modelfs.progress": progress,
                "user.modelfs.state": lambda: _json(self.state_of(version.name))}


async def _value(text: str) -> bytes:
    return text.encode()


async def _json(value: Awaitable[Any]) -> bytes:
    return json.dumps(await value).encode()
