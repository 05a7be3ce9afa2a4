"""The thread side of a download: bring one model's partial file to its full size, verify it, make it the model.

Everything here runs in the download's worker threads, never on the trio loop. A coordinator thread (`run`)
resumes from the resume record, starts streams as `Growth` allows, records progress once a second and restarts
from byte 0 when the server has another version. Each stream claims parts from `Parts` and fetches them with
ranged GETs on a kept-alive connection (`PartGet`), reading the body straight into its own buffer and writing it
with `pwrite`. The one way progress reaches the loop is the `wake` callable (the registry's hand-off), called
when a write lets a waiting reader go. A reader never gets bytes of two versions: bytes readers may have read
are only ever continued by the same version, or by a new body that repeats them byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics
from .errors import DownloadFailed, Reason
from .partget import Changed, Corrupt, PartGet, Restart, Stopped
from .parts import Growth, Parts
from .ranged import BadAnswer
from .ranges import RangeSet
from .resume import ResumeRecord
from .router import NotFound, Router, RouterError, describe
from .store import Store, is_disk_full
from .transport import TransportError

log = logging.getLogger(__name__)

#: How often the ranges on disk are recorded for resume (after an fdatasync): a kill -9 refetches at most this.
RECORD_EVERY = 1.0
TICK = 0.05  # how often the coordinator looks at the streams' throughput


class Halted(Exception):
    """Another stream of the same download failed: this one stops, keeping what it wrote."""


@dataclass(frozen=True)
class Job:
    """What a transfer needs to know about its download."""

    name: str
    fd: int  # the partial file, opened read-write
    mtime_ns: int  # the model's mtime once promoted
    streams: int  # at most this many ranged GETs at once
    retries: int


class Transfer:
    """One download's threads, from resume to promotion. `run` never raises: it returns the failure, if any."""

    def __init__(self, job: Job, store: Store, router: Router, parts: Parts, wake: Callable[[], None],
                 stop: threading.Event) -> None:
        self.job = job
        self.store = store
        self.parts = parts
        self.stop = stop
        self.record = ResumeRecord(store, job.name, job.fd)
        self.get = PartGet(job.name, job.fd, router, parts, self.record, wake)
        self.growth = Growth(job.streams)
        self._halt = threading.Event()
        self._errors: list[BaseException] = []

    def run(self) -> DownloadFailed | None:
        """Fetch, verify and promote the model; the outcome, with a reason when it failed. Never raises."""
        name = self.job.name
        began = time.monotonic()
        error: DownloadFailed | None = None
        try:
            self._fetch()
            self._verify()
            path = self.store.promote(name, self.job.fd, self.job.mtime_ns)
            seconds = time.monotonic() - began
            fetched = self.parts.fetched
            log.info("downloaded %s: %d bytes (%d fetched) in %.2fs, %.1f MB/s, %s, %d connection(s), into %s",
                     name, os.fstat(self.job.fd).st_size, fetched, seconds, fetched / seconds / 1e6 if seconds
                     else 0.0, self._streams_text(), self.get.connections, path)
        except Stopped:
            error = DownloadFailed(errno.EIO, f"download of {name} stopped: unmounting (partial kept)",
                                   Reason.UNMOUNT)
            log.info("download of %s stopped by unmount; partial download kept for resume", name)
        except NotFound:
            error = DownloadFailed(errno.ENOENT, f"model {name!r}: router says not found", Reason.NOT_FOUND)
            log.info("download of %s: router answered 404", name)
            self.store.discard_partial(name)
        except OSError as exc:
            if is_disk_full(exc):
                error = DownloadFailed(errno.ENOSPC, f"store {self.store.root} is full", Reason.STORE_FULL)
                log.error("download of %s failed: store %s is full (%s); partial removed",
                          name, self.store.root, exc.strerror)
                self.store.discard_partial(name)
            else:
                error = DownloadFailed(errno.EIO, f"download of {name}: {exc}", Reason.ERROR)
                log.error("download of %s failed: %s; partial kept for the next try", name, exc)
        except DownloadFailed as exc:
            error = exc
            discard = exc.reason in (Reason.CORRUPT, Reason.CHANGED)
            if discard:
                self.store.discard_partial(name)
            log.error("download of %s failed: %s%s", name, exc, "; discarded" if discard else "")
        except Exception as exc:  # noqa: BLE001 - the daemon must keep serving other models
            error = DownloadFailed(errno.EIO, f"download of {name}: {exc}", Reason.ERROR)
            log.exception("download of %s failed unexpectedly", name)
        metrics.download_finished(error.reason if error else None, self.parts.fetched, time.monotonic() - began)
        return error

    def _streams_text(self) -> str:
        if not self.growth.rates:
            return "1 stream"
        rates = ", ".join(f"{rate / 1e6:.0f}" for rate in self.growth.rates)
        return f"{self.growth.target} stream(s) (MB/s with 1, 2, ...: {rates})"

    def _fetch(self) -> None:
        """Bring the partial file to its full size, resuming what is on disk; restart on a new version."""
        name = self.job.name
        version, done = self.record.load()
        total = (version.total if version else None) or self.parts.total
        if done.size:
            first = (done.gaps(0, total) or [(total, total)])[0][0] if total else done.prefix()
            log.info("resuming download of %s at byte %d (%d bytes on disk in %d ranges)",
                     name, first, done.size, len(done))
        self.parts.reset(total, done)
        restarts = 0
        while True:
            try:
                self._streams()
                return
            except Restart as exc:
                if self.parts.seen(0, 1 << 62):
                    raise Changed(name, str(exc)) from None
                restarts += 1
                if restarts > self.job.retries:
                    raise DownloadFailed(errno.EIO, f"model {name!r}: {exc}, {restarts} times; giving up",
                                         Reason.ERROR) from None
                log.info("download of %s: %s; starting over from byte 0", name, exc)
                self.record.restart(None)
                self.parts.reset(self.parts.total, RangeSet())

    def _streams(self) -> None:
        """Run the streams: one first; once its answer shows the server honours ranges (a 206 with the size),
        as many as `Growth` allows. Records progress every RECORD_EVERY seconds, and once more at the end.

        A llmlb router answers the first (ranged) request with 200 and the whole file: that one GET is all.
        """
        self._halt.clear()
        self._errors = []
        self.get.new_run()
        workers = [self._spawn(0)]
        recorded = time.monotonic()
        try:
            while any(worker.is_alive() for worker in workers):
                self._halt.wait(TICK)
                now = time.monotonic()
                if self.get.parallel and not self._halt.is_set():
                    while len(workers) < self.growth.sample(now, self.parts.fetched):
                        workers.append(self._spawn(len(workers)))
                if now - recorded >= RECORD_EVERY:
                    self.record.save(self.parts.snapshot)
                    recorded = now
        finally:
            self._halt.set()
            for worker in workers:
                worker.join()
            self.record.save(self.parts.snapshot)
        if self._errors:
            raise next((e for e in self._errors if isinstance(e, Stopped)), self._errors[0])

    def _spawn(self, index: int) -> threading.Thread:
        thread = threading.Thread(target=self._stream, args=(index,), name=f"download {self.job.name} #{index}",
                                  daemon=True)
        thread.start()
        return thread

    def _stream(self, index: int) -> None:
        """One stream: parts, one after the other, on the stream's own buffer (and, mostly, connection).
        A stream the growth policy retired (its index past the target) ends after its part."""
        buffer = memoryview(bytearray(self.get.buffer_size))
        try:
            while not self._halt.is_set() and (index == 0 or index < self.growth.target):
                part = self.parts.claim()
                if part is None:
                    return
                self._part(part, buffer)
        except BaseException as exc:  # noqa: BLE001 - handed to the coordinator
            if not isinstance(exc, Halted):
                self._errors.append(exc)
            self._halt.set()

    def _part(self, part: int, buffer: memoryview) -> None:
        """Fetch one part, retrying what is left of it (never the other parts) with backoff."""
        failures = 0
        try:
            while True:
                if self.stop.is_set():
                    raise Stopped
                if self._halt.is_set():
                    raise Halted
                start, end = self.parts.span(part)
                if end is not None and start >= end:
                    return
                try:
                    self.get.fetch(part, buffer, self._running)
                    if self.parts.span(part)[1] is None:
                        return  # a body of unknown size ended: that was all of it
                except (TransportError, RouterError, BadAnswer) as exc:
                    failures += 1
                    if failures > self.job.retries:
                        raise DownloadFailed(errno.EIO, f"{describe(exc)} (gave up after {failures} tries, "
                                             f"{self.parts.progress()} bytes kept for resume)", Reason.ERROR) from None
                    delay = min(0.2 * 2 ** (failures - 1), 5.0)
                    log.warning("download of %s: %s at byte %d; retrying in %.1fs (try %d of %d)", self.job.name,
                                describe(exc), self.parts.span(part)[0], delay, failures + 1, self.job.retries + 1)
                    if self.stop.wait(delay):
                        raise Stopped from None
        finally:
            self.parts.release(part)

    def _running(self) -> None:
        """Called by a stream between writes: raise if the mount is going away or another stream failed."""
        if self.stop.is_set():
            raise Stopped
        if self._halt.is_set():
            raise Halted

    def _verify(self) -> None:
        """The last gate before a file becomes a model: length, every range on disk, magic, digest."""
        name, fd = self.job.name, self.job.fd
        version = self.record.version
        size = os.fstat(fd).st_size
        if version is not None and version.total is not None and size != version.total:
            raise DownloadFailed(errno.EIO, f"model {name!r}: got {size} bytes, router promised {version.total}",
                                 Reason.ERROR)
        if not self.parts.covers(0, size):
            raise DownloadFailed(errno.EIO, f"model {name!r}: bytes missing at {list(self.parts.snapshot())}",
                                 Reason.ERROR)
        if os.pread(fd, 4, 0) != b"GGUF":
            raise Corrupt(f"model {name!r}: router sent a file that is not GGUF (bad magic)")
        if version is not None and version.digest and _sha256(fd) != version.digest:
            raise Corrupt(f"model {name!r}: SHA-256 differs from the router's digest")


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 8 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()
