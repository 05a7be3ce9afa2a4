"""The download registry, on the trio loop: at most one download per model, shared by every opener, readers
waiting on it, and the last failure of each model.

A `Download` is the loop's view of one download: whether it is done, why it failed, who waits for which bytes.
Its bytes are fetched by `transfer.Transfer` in worker threads, which share only `Download.parts` (under its
lock) with the loop, and hand progress over in one place, `Handoff`. A model becomes visible only after the
transfer verified and promoted it; the download leaves the registry after that, never before.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable

import trio

from . import metrics
from .errors import DownloadFailed, Failure, Reason
from .parts import Parts
from .ranges import RangeSet
from .resume import ranges_of
from .router import Router
from .store import Store
from .transfer import Job, Transfer

log = logging.getLogger(__name__)


class Handoff:
    """The one place where a download's threads hand progress to the trio loop.

    `wake()`, from any thread, asks the loop to run `deliver` soon (`TrioToken.run_sync_soon`, which never blocks
    the thread). Wake-ups coalesce: while one is pending, more cost nothing, so the loop wakes at most once per
    burst of writes, and only when a write lets a reader go (the threads ask `Parts` before waking anyone).
    """

    def __init__(self, token: trio.lowlevel.TrioToken, deliver: Callable[[], None]) -> None:
        self._token = token
        self._deliver = deliver
        self._lock = threading.Lock()
        self._pending = False

    def wake(self) -> None:
        with self._lock:
            if self._pending:
                return
            self._pending = True
        try:
            self._token.run_sync_soon(self._run)
        except trio.RunFinishedError:
            pass  # unmounted: the loop is gone, and nobody waits any more

    def _run(self) -> None:  # on the loop
        with self._lock:
            self._pending = False  # before delivering: a write after this point schedules another wake-up
        self._deliver()


class Download:
    """One model's download, as the trio loop sees it. `done`, `error` and the waiters are the loop's alone;
    bytes and parts are asked from `parts`, which the download's threads share under its lock."""

    def __init__(self, name: str, fd: int, size_hint: int | None, part_size: int = 8 << 20) -> None:
        self.name = name
        self.fd = fd
        self.parts = Parts(part_size)
        self.parts.total = size_hint
        self.done = False
        self.error: DownloadFailed | None = None
        self.started = time.monotonic()
        # The model's mtime from now on, kept by the promoted file: each download's own, so a model downloaded
        # again (whose partial file may get a recycled inode number) never has the identity of an earlier one.
        self.mtime_ns = time.time_ns()
        self.stop = threading.Event()  # set on unmount: the threads stop, keeping the partial file
        self._waiters: dict[tuple[int, int], list[trio.Event]] = {}  # range → the readers waiting for it

    @property
    def total(self) -> int | None:
        """The model's size: the size hint until the server told it."""
        with self.parts.lock:
            return self.parts.total

    @property
    def progress(self) -> int:
        """Bytes on disk (with parts filling out of order: how many, not up to where)."""
        return self.parts.progress()

    def rate(self) -> float:
        """Bytes per second fetched since the download (re)started."""
        elapsed = time.monotonic() - self.started
        with self.parts.lock:
            fetched = self.parts.fetched
        return fetched / elapsed if elapsed > 0 else 0.0

    def in_flight(self) -> list[list[int]]:
        return self.parts.in_flight()

    def deliver(self) -> None:
        """On the loop, from `Handoff`: wake the readers whose bytes are on disk now (and only those)."""
        for key in self.parts.take_ready():
            for event in self._waiters.pop(key, ()):
                event.set()

    def finish(self, error: DownloadFailed | None) -> None:
        """The download ended (promoted, failed or stopped): every reader still waiting goes."""
        self.done = True
        self.error = error
        waiters, self._waiters = self._waiters, {}
        for events in waiters.values():
            for event in events:
                event.set()

    async def wait_for(self, offset: int, end: int) -> None:
        """Return once bytes [offset, end) are on disk; raise the download's error if they never will be.

        While waiting, the offset steers the download: the next part to start covers it.
        """
        while not self.done and not self.parts.wait(offset, end):
            event = trio.Event()
            self._waiters.setdefault((offset, end), []).append(event)
            try:
                await event.wait()
            finally:
                if not event.is_set():  # cancelled (the reader went away) rather than woken
                    events = self._waiters.get((offset, end), [])
                    if event in events:
                        events.remove(event)
                        if not events:
                            del self._waiters[offset, end]
                    self.parts.unwait(offset, end)
        if not self.parts.covers(offset, end) and self.error is not None:
            raise self.error


class Fetcher:
    """Owns every download in progress, at most one per model name, and the last failure of each model."""

    def __init__(self, store: Store, router: Router, retries: int) -> None:
        self.store = store
        self.router = router
        self.retries = retries
        self.streams = max(1, router.download_streams)
        self.part_size = max(1 << 20, router.download_part_size)
        self.downloads: dict[str, Download] = {}
        self.failures: dict[str, DownloadFailed] = {}  # the last failure of each model, for status; cleared on start
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host download tasks until cancelled (unmount); they outlive the openers that started them."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            for download in self.downloads.values():
                download.stop.set()

    def start(self, name: str, size_hint: int | None = None) -> Download:
        """The download of `name`: the running one, or a new one. Creates the partial file before returning."""
        download = self.downloads.get(name)
        if download is not None and not (download.done and download.error):  # a failed one is on its way out
            return download
        assert self._nursery is not None, "Fetcher.run() is not running"
        partial = self.store.partial_path(name)
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Failure(exc.errno or errno.EIO, f"cannot create {partial}: {exc.strerror}") from None
        download = Download(name, fd, size_hint, self.part_size)
        metrics.DOWNLOADS_STARTED.inc()
        self.downloads[name] = download
        self.failures.pop(name, None)
        self._nursery.start_soon(self._run, download)
        return download

    def resume(self, name: str, size_hint: int | None, mtime_ns: int) -> Download:
        """`start` for a daemon taking over a mount whose previous daemon was downloading `name` (see `recovery`).

        The download keeps that daemon's mtime, so the model keeps its identity (and its inode in the mount), and
        the bytes on disk count as already served: they are readable at once, and a server that answers with
        other bytes fails the download (EIO) rather than mixing two versions under a reader.
        """
        fresh = name not in self.downloads
        download = self.start(name, size_hint)
        if fresh:
            download.mtime_ns = mtime_ns
            # What the record says is on disk, known before the first read the kernel sends again: those bytes
            # are served at once, not when the transfer happens to write near them.
            record = self.store.read_sidecar(name)
            done = ranges_of(record, os.fstat(download.fd).st_size) if record else RangeSet()
            download.parts.reset(download.total, done)
            with download.parts.lock:
                download.parts.confirmed = True
        return download

    async def _run(self, download: Download) -> None:
        assert self._token is not None
        job = Job(download.name, download.fd, download.mtime_ns, self.streams, self.retries)
        transfer = Transfer(job, self.store, self.router, download.parts, Handoff(self._token, download.deliver).wake,
                            download.stop)
        error: DownloadFailed | None = None
        finished = False
        try:
            error = await trio.to_thread.run_sync(transfer.run, abandon_on_cancel=True)
            finished = True
        finally:
            if self.downloads.get(download.name) is download:  # an open after its failure may have a new one
                del self.downloads[download.name]
            if finished:
                os.close(download.fd)  # readers hold their own dup()s
            else:  # unmount: the threads stop at their next write and keep the partial file
                download.stop.set()
                error = DownloadFailed(errno.EIO, f"download of {download.name} stopped: unmounting",
                                       Reason.UNMOUNT)
            if error is not None:
                self.failures[download.name] = error
            download.finish(error)
