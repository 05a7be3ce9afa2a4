"""Shared directories (typically NFS exports of the router's models directory), read in place, never written.

A network filesystem can hang forever (dead server) or fail with ENOTCONN (disconnected). So nothing here runs
on the trio loop: every call goes to a worker thread, at most THREADS_PER_DIR per directory, and may run for
`shared_timeout` once it has a thread (waiting for one is not counted: a busy share is not a hung one). A directory
that times out or disconnects is marked unavailable (one log line) and skipped; a prober with a thread of its own
(statvfs, which no client caches) marks a hung directory down without a lookup paying for it and brings it back
when it answers again. Every descriptor opened here is closed, also when its call was given up (`open`, `close`).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
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
#: Worker threads one directory's calls may hold at once: a hung server can pin this many threads, never more.
THREADS_PER_DIR = 8
PROBE_INTERVAL = 1.0


class SharedUnavailable(Exception):
    """The shared directory is hung or disconnected; the caller skips it."""


class _Handoff:
    """A descriptor a worker thread opened for a caller that may have given up meanwhile: whichever side learns
    that the caller is gone closes it, so it is closed exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._abandoned = False

    def give(self, fd: int) -> bool:
        """In the thread: hand `fd` over; False if the caller already gave up (the thread closes it then)."""
        with self._lock:
            if self._abandoned:
                return False
            self._fd = fd
            return True

    def taken(self) -> None:
        """On the loop: the caller has the descriptor."""
        with self._lock:
            self._fd = None

    def abandon(self) -> int | None:
        """On the loop: the caller gives up; returns a descriptor handed over but never delivered, to close."""
        with self._lock:
            self._abandoned = True
            fd, self._fd = self._fd, None
            return fd


class SharedDir:
    """One shared directory and its health."""

    def __init__(self, root: Path, timeout: float) -> None:
        self.root = root
        self.timeout = timeout
        self.available = True
        self.reason = ""
        self._limiter = trio.CapacityLimiter(THREADS_PER_DIR)
        self._probe_thread = trio.CapacityLimiter(1)  # the prober's own: never queued behind the calls
        self._probing = False
        self._waiting: set[trio.CancelScope] = set()  # calls in flight, released at once when the dir goes down
        self._closes: queue.SimpleQueue[tuple[int, Callable[[], None], Callable[[], None]]] = queue.SimpleQueue()
        self._closer: threading.Thread | None = None
        metrics.SHARED_AVAILABLE.labels(dir=str(root)).set(1)

    def __repr__(self) -> str:
        return f"SharedDir({str(self.root)!r}, available={self.available})"

    async def _run(self, scope: trio.CancelScope, limiter: trio.CapacityLimiter, fn: Callable[..., T],
                   *args: object) -> T:
        """`fn(*args)` in a thread of `limiter`; `scope` gets its deadline once the call runs, not while it waits."""
        token = trio.lowlevel.current_trio_token()
        timeout = self.timeout

        def arm() -> None:
            scope.deadline = min(scope.deadline, trio.current_time() + timeout)

        def work() -> T:
            token.run_sync_soon(arm)  # runs on the loop before the result can: the clock starts now
            return fn(*args)

        return await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=limiter)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in a worker thread; SharedUnavailable if the directory is down, hangs or disconnects."""
        if not self.available:
            raise SharedUnavailable(self.reason)
        with trio.CancelScope() as scope:
            self._waiting.add(scope)
            try:
                return await self._run(scope, self._limiter, fn, *args)
            except OSError as exc:
                if exc.errno in OUTAGE_ERRNOS:
                    self.mark_down(f"{os.strerror(exc.errno)}")
                    raise SharedUnavailable(self.reason) from exc
                raise
            finally:
                self._waiting.discard(scope)
        if self.available:  # our own timeout, not another call's or the prober's verdict
            self.mark_down(f"no answer within {self.timeout:g}s")
        raise SharedUnavailable(self.reason)

    async def open(self, path: Path) -> tuple[int, os.stat_result]:
        """Open a file of this directory for reading, with its `fstat`, in one call. The descriptor is never lost:
        closed if `fstat` fails, and closed by whoever is last when the call is given up (timeout, outage)."""
        handoff = _Handoff()

        def open_and_stat() -> tuple[int, os.stat_result]:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            if not handoff.give(fd):
                os.close(fd)
                raise OSError(errno.ECANCELED, "open given up")
            return fd, st

        try:
            fd, st = await self.call(open_and_stat)
        except BaseException:
            lost = handoff.abandon()
            if lost is not None:
                self.close_soon(lost)
            raise
        handoff.taken()
        return fd, st

    def close_soon(self, fd: int, before: Callable[[], None] = lambda: None,
                   closed: Callable[[], None] = lambda: None) -> None:
        """Close `fd` (after `before()`) in this directory's closer thread; never blocks. On a hung server the
        descriptors wait there, still open, and are all closed once it answers: none is ever dropped."""
        if self._closer is None:
            self._closer = threading.Thread(target=self._close_forever, name=f"close {self.root}", daemon=True)
            self._closer.start()
        self._closes.put((fd, before, closed))

    def _close_forever(self) -> None:
        while True:
            fd, before, closed = self._closes.get()
            try:
                before()
            except OSError:
                pass
            try:
                os.close(fd)
            except OSError:
                pass
            try:
                closed()
            except trio.RunFinishedError:  # unmounted meanwhile: nobody waits for it any more
                pass

    async def close(self, fd: int, before: Callable[[], None] = lambda: None) -> None:
        """Close a file of this directory without ever blocking the loop; waits at most `shared_timeout` for it."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        self.close_soon(fd, before, lambda: token.run_sync_soon(done.set))
        with trio.move_on_after(self.timeout):
            await done.wait()
            return
        log.debug("close of fd %d on %s did not return within %gs", fd, self.root, self.timeout)

    def mark_down(self, reason: str) -> None:
        """Skip this directory from now on, and release every call still waiting on it."""
        if self.available:
            log.warning("shared directory %s unavailable (%s); skipping it until it answers again", self.root, reason)
            self.available = False
            self.reason = reason
            metrics.SHARED_AVAILABLE.labels(dir=str(self.root)).set(0)
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
        """Ask the server something it cannot answer from a cache, in the prober's own thread; at most one probe
        in flight. A probe whose thread is still stuck in an earlier outage waits for it: the directory stays
        down until that call returns, then the next probe brings it back."""
        if self._probing:
            return
        self._probing = True
        try:
            with trio.CancelScope() as scope:
                try:
                    await self._run(scope, self._probe_thread, os.statvfs, self.root)
                except OSError as exc:
                    self.mark_down(os.strerror(exc.errno) if exc.errno else str(exc))
                    return
            if scope.cancelled_caught:
                self.mark_down(f"no answer within {self.timeout:g}s")
                return
            if not self.available:
                log.warning("shared directory %s is back", self.root)
                metrics.SHARED_AVAILABLE.labels(dir=str(self.root)).set(1)
            self.available = True
            self.reason = ""
        finally:
            self._probing = False

    async def probe_forever(self) -> None:
        """Keep `available` current in the background, so lookups rarely meet a hung server themselves."""
        while True:
            await self.probe()
            await trio.sleep(PROBE_INTERVAL)
