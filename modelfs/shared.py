"""Shared directories (typically NFS exports of the router's models directory), read in place, never written.

A network filesystem can hang forever (dead server) or fail with ENOTCONN (disconnected). So nothing here runs
on the trio loop: every call goes to a worker thread, bounded by a per-directory thread limit and a timeout. A
directory that times out or disconnects is marked unavailable (one log line) and skipped, and a background prober
(statvfs, which no client caches) brings it back when it answers again. Lookups therefore wait on a dead server
at most once per outage, for at most `shared_timeout`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from . import layout, metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that say the directory (its server or connection), not one file, is gone.
OUTAGE_ERRNOS = frozenset(
    {errno.ENOTCONN, errno.ESTALE, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.ECONNABORTED,
     errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETUNREACH, errno.ENODEV}
)
#: Worker threads one directory may hold at once: a hung server can pin this many threads, never more.
THREADS_PER_DIR = 8
PROBE_INTERVAL = 1.0


class SharedUnavailable(Exception):
    """The shared directory is hung or disconnected; the caller skips it."""


class SharedDir:
    """One shared directory and its health."""

    def __init__(self, root: Path, timeout: float) -> None:
        self.root = root
        self.timeout = timeout
        self.available = True
        self.reason = ""
        self._limiter = trio.CapacityLimiter(THREADS_PER_DIR)
        self._probing = False
        self._waiting: set[trio.CancelScope] = set()  # calls in flight, released at once when the dir goes down

    def __repr__(self) -> str:
        return f"SharedDir({str(self.root)!r}, available={self.available})"

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in a worker thread; SharedUnavailable if the directory is down, hangs or disconnects."""
        if not self.available:
            raise SharedUnavailable(self.reason)
        limit = self.timeout
        with trio.move_on_after(limit) as scope:
            self._waiting.add(scope)
            try:
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self._limiter)
            except OSError as exc:
                if exc.errno in OUTAGE_ERRNOS:
                    self.mark_down(f"{os.strerror(exc.errno)}")
                    raise SharedUnavailable(self.reason) from exc
                raise
            finally:
                self._waiting.discard(scope)
        if self.available:  # our own timeout, not another call's or the prober's verdict
            self.mark_down(f"no answer within {limit:g}s")
        raise SharedUnavailable(self.reason)

    async def close(self, fd: int, before: Callable[[], None] = lambda: None) -> None:
        """Close a file of this directory without ever blocking the loop; a hung close leaks the fd, no more."""

        def close() -> None:
            try:
                before()
            finally:
                os.close(fd)

        with trio.move_on_after(self.timeout):
            try:
                await trio.to_thread.run_sync(close, abandon_on_cancel=True, limiter=self._limiter)
            except OSError:
                pass
            return
        log.debug("close of fd %d on %s did not return within %gs", fd, self.root, self.timeout)

    def mark_down(self, reason: str) -> None:
        """Skip this directory from now on, and release every call still waiting on it."""
        if self.available:
            log.warning("shared directory %s unavailable (%s); skipping it until it answers again", self.root, reason)
            self.available = False
            self.reason = reason
            metrics.SHARED_OUTAGES.labels(dir=str(self.root)).inc()
            for scope in self._waiting:
                scope.cancel()

    async def find(self, name: str) -> layout.Found | None:
        return await self.call(layout.locate, self.root, name)

    async def is_dir(self, prefix: str) -> bool:
        return await self.call(layout.is_dir, self.root, prefix)

    async def read_level(self, prefix: str) -> layout.Level:
        return await self.call(layout.read_level, self.root, prefix)

    async def probe(self) -> None:
        """Ask the server something it cannot answer from a cache; at most one probe in flight."""
        if self._probing:
            return
        self._probing = True
        try:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    await trio.to_thread.run_sync(os.statvfs, self.root, abandon_on_cancel=True,
                                                  limiter=self._limiter)
                except OSError as exc:
                    self.mark_down(os.strerror(exc.errno) if exc.errno else str(exc))
                    return
            if scope.cancelled_caught:
                self.mark_down(f"no answer within {self.timeout:g}s")
                return
            if not self.available:
                log.warning("shared directory %s is back", self.root)
            self.available = True
            self.reason = ""
        finally:
            self._probing = False

    async def probe_forever(self) -> None:
        """Keep `available` current in the background, so lookups rarely meet a hung server themselves."""
        while True:
            await self.probe()
            await trio.sleep(PROBE_INTERVAL)
