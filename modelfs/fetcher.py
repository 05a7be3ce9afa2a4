"""Downloads from the router into the local store: one task per model, readers served as bytes arrive.

Concurrency model: a `Download` lives on the trio loop (progress, waiters); its bytes are fetched by one blocking
worker thread (httpx streaming, `pwrite` to a hidden partial file) that reports progress back to the loop with
`TrioToken.run_sync_soon`, which never blocks the thread. Every opener of the model shares that one Download, so
the router sends each model once. The partial file and its sidecar (what the server said: size, validator,
digest) survive a crash; the next download resumes with `Range`/`If-Range` and starts over when the server
answers 200 or a different version. A model becomes visible only after length, GGUF magic and (when the router
gave one) digest are checked, the file fsynced and renamed.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from . import metrics
from .errors import Failure
from .ranges import RangeSet
from .router import NotFound, Router, RouterError, _describe, iter_body
from .store import Store, is_disk_full

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: Bytes per write and per progress report: large enough to keep syscalls and loop wake-ups cheap.
WRITE_CHUNK = 1 << 20
#: How often the ranges on disk are recorded for resume (after an fdatasync): a kill -9 refetches at most this.
RECORD_EVERY = 1.0
UNKNOWN = -1  # the end of a part when the file's size is not known
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Corrupt(Failure):
    """The router sent something that is not the model; the partial file is worthless."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class Stopped(Exception):
    """The mount is going away; the partial download is kept for next time."""


@dataclass
class Response:
    """What one blob response promised."""

    start: int
    total: int | None
    validator: str | None
    digest: str | None


class Restart(Exception):
    """The server's copy is not the one the partial file holds (validator, size, or a 200 to a ranged request)."""


class Changed(Corrupt):
    """The server's copy changed while readers may already have read bytes of the old one: those readers must
    never get bytes of the new one, so this download fails (EIO for what they have not read) and its partial
    file goes; the next open starts a new download in a new file, which is a new inode in the mount."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"model {name!r} changed on the server during the download ({why}); readers of the old "
                         "bytes get EIO, the next open downloads the new version")


class Halted(Exception):
    """Another part of the same download failed: this part stops, keeping what it wrote."""


class Parts:
    """A download's bytes: what is on disk, which parts are in flight, where readers wait.

    Shared by the trio loop (readers) and the download's threads, under one lock held only for a few list
    operations, so the loop never waits on it for long. A part is [start, end) with `end` UNKNOWN when the file's
    size is (one stream to the end of the body); `pos` is its next byte to write.
    """

    def __init__(self, part_size: int) -> None:
        self.lock = threading.Lock()
        self.part_size = part_size
        self.total: int | None = None
        self.done = RangeSet()  # written to the partial file: what readers may read
        self.flight: dict[int, list[int]] = {}  # part id → [start, pos, end]
        self.wanted: list[int] = []  # offsets readers wait at, most recent last
        self.fetched = 0  # bytes written in this run, for the log line
        self.confirmed = False  # the server's answer matched the version the partial file holds
        self._ids = itertools.count()

    def reset(self, total: int | None, done: RangeSet) -> None:
        with self.lock:
            self.total = total
            self.done = done
            for part in self.flight.values():
                part[0] = part[1] = 0

    def covers(self, start: int, end: int) -> bool:
        """Whether readers may read [start, end): resumed bytes only once the server confirmed their version."""
        with self.lock:
            return self.confirmed and self.done.covers(start, end)

    def seen(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) readers may already have read: a new body must repeat them byte for byte."""
        with self.lock:
            if not self.confirmed:
                return []
            pieces, at = [], start
            for gap_start, gap_end in [*self.done.gaps(start, end), (end, end)]:
                if at < gap_start:
                    pieces.append((at, gap_start))
                at = max(at, gap_end)
            return pieces

    def want(self, offset: int) -> None:
        """A reader waits at `offset`: the next part to start covers it, unless one in flight already does."""
        with self.lock:
            if offset not in self.wanted:
                self.wanted = [*self.wanted[-15:], offset]

    def claim(self) -> int | None:
        """A new part to fetch, or None when every byte is on disk or in flight.

        The lowest offset a reader waits at first (the kernel's read-ahead asks for several MiB ahead at once: the
        lowest one's part covers the others), else the lowest missing bytes; a part never overlaps bytes on disk
        or in flight. A reader at the end gets the next free stream, while one at byte 0 streams on in its part.
        """
        with self.lock:
            if self.total is None:  # unknown size: one stream, from the first missing byte to the end
                if self.flight:
                    return None
                return self._add(self.done.prefix(), UNKNOWN)
            taken = RangeSet(self.done)
            for start, _, end in self.flight.values():
                taken.add(start, self.total if end == UNKNOWN else end)
            gaps = taken.gaps(0, self.total)
            if not gaps:
                return None
            start, limit = gaps[0]
            while self.wanted:
                offset = min(self.wanted)
                self.wanted.remove(offset)
                gap = next(((s, e) for s, e in gaps if s <= offset < e), None)
                if gap is not None:
                    start, limit = max(gap[0], offset - offset % WRITE_CHUNK), gap[1]
                    break
            return self._add(start, min(limit, start + self.part_size))

    def _add(self, start: int, end: int) -> int:
        part = next(self._ids)
        self.flight[part] = [start, start, end]
        return part

    def span(self, part: int) -> tuple[int, int | None]:
        """(next byte, end) of a part; end None: to the end of the body."""
        with self.lock:
            _, pos, end = self.flight[part]
            return pos, None if end == UNKNOWN else end

    def set_span(self, part: int, start: int, end: int | None) -> None:
        """The server decided: a 200 brings the whole file, a first 206 tells the size."""
        with self.lock:
            self.flight[part] = [start, start, UNKNOWN if end is None else end]

    def wrote(self, part: int, start: int, end: int) -> None:
        with self.lock:
            self.done.add(start, end)
            self.flight[part][1] = end
            self.fetched += end - start

    def release(self, part: int) -> None:
        with self.lock:
            self.flight.pop(part, None)

    def snapshot(self) -> list[list[int]]:
        with self.lock:
            return [[s, e] for s, e in self.done]

    def in_flight(self) -> list[list[int]]:
        """[start, next byte, end] of each part being fetched (end -1: unknown), for status."""
        with self.lock:
            return sorted([*part] for part in self.flight.values())


class Download:
    """One model's download, shared by every reader of it. Its attributes are only touched on the trio loop."""

    def __init__(self, name: str, fd: int, size_hint: int | None, part_size: int = 8 << 20) -> None:
        self.name = name
        self.fd = fd
        self.total: int | None = size_hint
        self.done = False
        self.error: Failure | None = None
        self.started = time.monotonic()
        # The model's mtime from now on, kept by the promoted file: each download's own, so a model downloaded
        # again (whose partial file may get a recycled inode number) never has the identity of an earlier one.
        self.mtime_ns = time.time_ns()
        self.stop = threading.Event()
        self.parts = Parts(part_size)
        self.record_lock = threading.Lock()  # the resume record and a restart never interleave
        self.start_offset = 0  # bytes on disk when this run began (resumed downloads), for the rate
        self._waiters: list[tuple[int, int, trio.Event]] = []

    @property
    def progress(self) -> int:
        """Bytes on disk (with parts filling out of order: how many, not up to where)."""
        with self.parts.lock:
            return self.parts.done.size

    def rate(self) -> float:
        """Bytes per second since the download (re)started."""
        elapsed = time.monotonic() - self.started
        return max(self.progress - self.start_offset, 0) / elapsed if elapsed > 0 else 0.0

    def in_flight(self) -> list[list[int]]:
        return self.parts.in_flight()

    def _update(self, start: int = 0, end: int = 0, total: int | None = None) -> None:
        """Bytes [start, end) reached the disk: wake the readers they complete (and only those)."""
        if total is not None:
            self.total = total
        if not self._waiters:
            return
        with self.parts.lock:
            done = self.parts.done
            ready = [w for w in self._waiters if self.done or (self.parts.confirmed and w[0] < end and start < w[1]
                                                               and done.covers(w[0], w[1]))]
        for waiter in ready:
            self._waiters.remove(waiter)
            waiter[2].set()

    def _finish(self, error: Failure | None) -> None:
        self.done = True
        self.error = error
        self._update()

    async def wait_for(self, offset: int, end: int) -> None:
        """Return once bytes [offset, end) are on disk; raise the download's error if they never will be.

        While waiting, the offset steers the download: the next part to start covers it.
        """
        while not self.parts.covers(offset, end) and not self.done:
            self.parts.want(offset)
            event = trio.Event()
            self._waiters.append((offset, end, event))
            await event.wait()
        if not self.parts.covers(offset, end) and self.error is not None:
            raise self.error


class Fetcher:
    """Owns every download in progress, at most one per model name."""

    def __init__(self, store: Store, router: Router, retries: int) -> None:
        self.store = store
        self.router = router
        self.retries = retries
        self.streams = max(1, router.download_streams)
        self.part_size = max(WRITE_CHUNK, router.download_part_size)
        self.downloads: dict[str, Download] = {}
        self.failures: dict[str, Failure] = {}  # the last failure of each model, for status; cleared on success
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
        """`start` for a daemon taking over a mount whose previous daemon was downloading `name` (see `resume`).

        The download keeps that daemon's mtime, so the model keeps its identity (and its inode in the mount), and
        the bytes on disk count as already served: they are readable at once, and a server that answers with
        other bytes fails the download (EIO) rather than mixing two versions under a reader.
        """
        fresh = name not in self.downloads
        download = self.start(name, size_hint)
        if fresh:
            download.mtime_ns = mtime_ns
            with download.parts.lock:
                download.parts.confirmed = True
        return download

    async def _run(self, download: Download) -> None:
        finished = False
        try:
            await trio.to_thread.run_sync(self._fetch, download, abandon_on_cancel=True)
            finished = True
        finally:
            if self.downloads.get(download.name) is download:  # an open after its failure may have a new one
                del self.downloads[download.name]
            if download.error is not None:
                self.failures[download.name] = download.error
            if finished:
                os.close(download.fd)  # readers hold their own dup()s
            elif not download.done:
                download.stop.set()
                download._finish(Failure(errno.EIO, f"download of {download.name} stopped: unmounting"))

    # Everything below runs in the download's threads.

    def _report(self, download: Download, start: int = 0, end: int = 0, total: int | None = None) -> None:
        assert self._token is not None
        self._token.run_sync_soon(download._update, start, end, total)

    def _fetch(self, download: Download) -> None:
        """Fetch, verify and promote one model; report the outcome to the loop. Never raises."""
        name = download.name
        began = time.monotonic()
        fetched = 0
        error: Failure | None = None
        try:
            fetched = self._fetch_with_restarts(download)
            self._verify(download)
            path = self.store.promote(name, download.fd, download.mtime_ns)
            seconds = time.monotonic() - began
            size = os.fstat(download.fd).st_size
            log.info("downloaded %s: %d bytes (%d fetched) in %.2fs, %.1f MB/s, into %s",
                     name, size, fetched, seconds, fetched / seconds / 1e6 if seconds else 0.0, path)
        except Stopped:
            error = Failure(errno.EIO, f"download of {name} stopped: unmounting (partial kept)")
            log.info("download of %s stopped by unmount; partial download kept for resume", name)
        except NotFound:
            error = Failure(errno.ENOENT, f"model {name!r}: router says not found")
            log.info("download of %s: router answered 404", name)
            self.store.discard_partial(name)
        except OSError as exc:
            if is_disk_full(exc):
                error = Failure(errno.ENOSPC, f"store {self.store.root} is full")
                log.error("download of %s failed: store %s is full (%s); partial removed",
                          name, self.store.root, exc.strerror)
                self.store.discard_partial(name)
            else:
                error = Failure(errno.EIO, f"download of {name}: {exc}")
                log.error("download of %s failed: %s; partial kept for the next try", name, exc)
        except Failure as exc:
            error = exc
            if isinstance(exc, Corrupt):
                self.store.discard_partial(name)
            log.error("download of %s failed: %s%s", name, exc, "; discarded" if isinstance(exc, Corrupt) else "")
        except Exception as exc:  # noqa: BLE001 - the daemon must keep serving other models
            error = Failure(errno.EIO, f"download of {name}: {exc}")
            log.exception("download of %s failed unexpectedly", name)
        metrics.download_finished(error, fetched or download.parts.fetched, time.monotonic() - began)
        assert self._token is not None
        self._token.run_sync_soon(download._finish, error)

    def _fetch_with_restarts(self, download: Download) -> int:
        """Bring the partial file to its full size, resuming what is on disk; returns bytes fetched."""
        name = download.name
        sidecar = self.store.read_sidecar(name)
        size = os.fstat(download.fd).st_size
        if size and not sidecar:
            self._restart(download, "partial download without sidecar")
            size = 0
        ranges = sidecar.get("ranges")
        # A sidecar of a single-stream modelfs has no ranges: its file grew in order, so its size is what is there.
        recorded = [(int(s), int(e)) for s, e in ranges] if isinstance(ranges, list) else [(0, size)]
        done = RangeSet((s, min(e, size)) for s, e in recorded)
        total = sidecar.get("total") or download.total
        if done.size:
            first = (done.gaps(0, total) or [(total, total)])[0][0] if total else done.prefix()
            log.info("resuming download of %s at byte %d (%d bytes on disk in %d ranges)",
                     name, first, done.size, len(done))
        download.parts.reset(total, done)
        download.start_offset = done.size
        restarts = 0
        while True:
            try:
                self._fetch_parts(download, sidecar)
                return download.parts.fetched
            except Restart as exc:
                if download.parts.seen(0, 1 << 62):
                    raise Changed(name, str(exc)) from None
                restarts += 1
                if restarts > self.retries:
                    raise Failure(errno.EIO, f"model {name!r}: {exc}, {restarts} times; giving up") from None
                log.info("download of %s: %s; starting over from byte 0", name, exc)
                self._restart(download, None)
                sidecar = {}

    def _restart(self, download: Download, reason: str | None) -> None:
        if reason:
            log.info("download of %s: %s; starting from byte 0", download.name, reason)
        os.ftruncate(download.fd, 0)
        self.store.discard_sidecar(download.name)
        download.parts.reset(download.parts.total, RangeSet())

    def _fetch_parts(self, download: Download, sidecar: dict[str, Any]) -> None:
        """Run the parts: one stream first; once its answer shows the server honours ranges, the others too.

        A llmlb router answers the first (ranged) request with 200 and the whole file: that one GET is all.
        """
        decided = threading.Event()
        halt = threading.Event()
        errors: list[BaseException] = []
        state = {"sidecar": sidecar, "parallel": False}
        workers: list[threading.Thread] = []

        def work() -> None:
            try:
                while not halt.is_set() and (part := download.parts.claim()) is not None:
                    self._part(download, part, state, decided, halt)
            except BaseException as exc:  # noqa: BLE001 - handed to the coordinator below
                if not isinstance(exc, Halted):
                    errors.append(exc)
                halt.set()
            finally:
                decided.set()

        def spawn() -> None:
            thread = threading.Thread(target=work, name=f"download {download.name}", daemon=True)
            thread.start()
            workers.append(thread)

        recorder = threading.Thread(target=self._recorder, args=(download, state, halt), daemon=True)
        recorder.start()
        try:
            spawn()
            decided.wait()
            if state["parallel"] and not halt.is_set():
                for _ in range(self.streams - 1):
                    spawn()
            for thread in workers:
                thread.join()
        finally:
            halt.set()
            recorder.join()
        if errors:
            raise next((e for e in errors if isinstance(e, Stopped)), errors[0])

    def _recorder(self, download: Download, state: dict[str, Any], halt: threading.Event) -> None:
        """Record which ranges are on disk every RECORD_EVERY seconds, and once more when the parts stop.

        Data first, record second: the ranges are taken, then the file is fdatasync'ed, then the record replaced
        atomically, so no record ever claims a byte that a power cut could lose. One fdatasync a second costs
        nothing the promotion's fsync would not pay anyway, and a kill -9 loses at most that second of bytes.
        """
        while not halt.wait(RECORD_EVERY):
            self._record(download, state)
        self._record(download, state)

    def _record(self, download: Download, state: dict[str, Any]) -> None:
        with download.record_lock:
            sidecar = state["sidecar"]
            if not sidecar:
                return
            ranges = download.parts.snapshot()
            try:
                os.fdatasync(download.fd)
                self.store.write_sidecar(download.name, {**sidecar, "ranges": ranges})
            except OSError as exc:
                log.warning("download of %s: cannot record progress for resume: %s", download.name, exc)

    def _part(self, download: Download, part: int, state: dict[str, Any], decided: threading.Event,
              halt: threading.Event) -> None:
        """Fetch one part, retrying what is left of it (never the other parts) with backoff."""
        name = download.name
        failures = 0
        try:
            while True:
                if download.stop.is_set():
                    raise Stopped
                if halt.is_set():
                    raise Halted
                start, end = download.parts.span(part)
                if end is not None and start >= end:
                    return
                where = [""]
                try:
                    self._request(download, part, state, decided, halt, where)
                    if download.parts.span(part)[1] is None:
                        return  # a body of unknown size ended: that was all of it
                except (httpx.HTTPError, RouterError) as exc:
                    failures += 1
                    if failures > self.retries:
                        raise Failure(errno.EIO, f"{where[0]}{_describe(exc)} (gave up after {failures} tries, "
                                      f"{download.progress} bytes kept for resume)") from None
                    delay = min(0.2 * 2 ** (failures - 1), 5.0)
                    log.warning("download of %s: %s%s at byte %d; retrying in %.1fs (try %d of %d)",
                                name, where[0], _describe(exc), download.parts.span(part)[0], delay,
                                failures + 1, self.retries + 1)
                    if download.stop.wait(delay):
                        raise Stopped from None
        finally:
            download.parts.release(part)

    def _request(self, download: Download, part: int, state: dict[str, Any], decided: threading.Event,
                 halt: threading.Event, where: list[str]) -> None:
        """One GET for what is left of a part, ranged, guarded by If-Range once a validator is known."""
        parts = download.parts
        start, end = parts.span(part)
        sidecar: dict[str, Any] = state["sidecar"]
        open_ended = end is None or end == parts.total
        headers = {"Range": f"bytes={start}-" if open_ended else f"bytes={start}-{end - 1}"}  # type: ignore[operator]
        if sidecar.get("validator"):
            headers["If-Range"] = sidecar["validator"]
        with self.router.stream(download.name, headers) as response:
            where[0] = f"{response.url}: "
            answer = parse_response(response)
            if response.status_code != 206:
                if state["parallel"]:
                    raise Restart("the server sent the whole file to a ranged request (a new version?)")
                # One stream takes the whole body from byte 0: a server without Range, or a new version.
                with download.record_lock:
                    if download.progress or sidecar:
                        log.info("download of %s: server sent the whole file; starting over from byte 0",
                                 download.name)
                    if parts.seen(0, 1 << 62):
                        # Readers may have read bytes of this body's first run: keep them, and `_flush` checks
                        # the new body repeats them (a server without validators gives no other proof).
                        if answer.total != parts.total:
                            raise Changed(download.name, f"size {answer.total}, was {parts.total}")
                    else:
                        self._restart(download, None)
                        parts.reset(answer.total, RangeSet())
                    parts.set_span(part, 0, answer.total)
                    state["sidecar"] = self._new_sidecar(download, answer)
            elif answer.start != start:
                raise RouterError(f"asked for byte {start}, got a body starting at {answer.start}")
            elif sidecar and (sidecar.get("total") != answer.total or sidecar.get("validator") != answer.validator):
                raise Restart(f"the server has another version (size {answer.total}, validator "
                              f"{answer.validator!r}; the partial file holds {sidecar.get('total')}, "
                              f"{sidecar.get('validator')!r})")
            elif not decided.is_set():
                # The first answer: the server honours ranges. Now the size is known, parts can follow.
                with download.record_lock:
                    if not sidecar:
                        state["sidecar"] = self._new_sidecar(download, answer)
                    with parts.lock:
                        parts.total = answer.total
                    if answer.total is not None:
                        parts.set_span(part, start, min(end or answer.total, answer.total,
                                                        start + parts.part_size))
                state["parallel"] = answer.total is not None
            if not parts.confirmed:
                with parts.lock:
                    parts.confirmed = True
                self._report(download, 0, answer.total or 1 << 62, answer.total)  # resumed bytes: readable now
            decided.set()
            self._report(download, total=answer.total)
            position, end = parts.span(part)
            self._copy(download, part, response, position, end, halt)
            position = parts.span(part)[0]
            if end is not None and position < end:
                raise httpx.RemoteProtocolError(f"body ended at byte {position} of {end}")

    def _new_sidecar(self, download: Download, answer: Response) -> dict[str, Any]:
        sidecar = {"total": answer.total, "validator": answer.validator, "digest": answer.digest}
        self.store.write_sidecar(download.name, {**sidecar, "ranges": []})
        return sidecar

    def _copy(self, download: Download, part: int, response: httpx.Response, position: int, end: int | None,
              halt: threading.Event) -> None:
        """Write the body at `position` in large writes up to `end`, reporting each write to the readers.

        Whatever arrived is written even when the body breaks off, so a retry never fetches it twice.
        """
        pending: list[bytes] = []
        size = 0
        try:
            for chunk in iter_body(response):
                if position == 0 and size == 0 and not chunk.startswith(GGUF_MAGIC[: len(chunk)]):
                    raise Corrupt(f"model {download.name!r}: router sent a file that is not GGUF "
                                  f"(starts with {chunk[:8]!r})")
                if end is not None and position + size + len(chunk) > end:
                    chunk = chunk[: end - position - size]  # a server that sent more than asked
                pending.append(chunk)
                size += len(chunk)
                if end is not None and position + size >= end:
                    break
                if size >= WRITE_CHUNK:
                    position += self._flush(download, part, pending, position)
                    size = 0
                    if download.stop.is_set():
                        raise Stopped
                    if halt.is_set():
                        raise Halted
        finally:
            if pending:
                self._flush(download, part, pending, position)

    def _flush(self, download: Download, part: int, pending: list[bytes], position: int) -> int:
        seen = download.parts.seen(position, position + sum(map(len, pending)))
        if seen:
            data = b"".join(pending)
            for start, end in seen:
                if os.pread(download.fd, end - start, start) != data[start - position:end - position]:
                    raise Changed(download.name, f"bytes {start}-{end - 1} differ from the ones already served")
        written = _write(download.fd, pending, position)
        pending.clear()
        download.parts.wrote(part, position, position + written)
        self._report(download, position, position + written)
        return written

    def _verify(self, download: Download) -> None:
        """The last gate before a file becomes a model: length, every range on disk, magic, digest."""
        sidecar = self.store.read_sidecar(download.name)
        size = os.fstat(download.fd).st_size
        total = sidecar.get("total")
        if total is not None and size != total:
            raise Failure(errno.EIO, f"model {download.name!r}: got {size} bytes, router promised {total}")
        if not download.parts.covers(0, size):
            raise Failure(errno.EIO, f"model {download.name!r}: bytes missing at {download.parts.snapshot()}")
        if os.pread(download.fd, 4, 0) != GGUF_MAGIC:
            raise Corrupt(f"model {download.name!r}: router sent a file that is not GGUF (bad magic)")
        digest = sidecar.get("digest")
        if digest and _sha256(download.fd) != digest:
            raise Corrupt(f"model {download.name!r}: SHA-256 differs from the router's digest")


def _write(fd: int, chunks: list[bytes], offset: int) -> int:
    written = os.pwritev(fd, chunks, offset)
    expected = sum(len(c) for c in chunks)
    while written < expected:  # short writes happen only near a full disk; finish or raise ENOSPC
        data = b"".join(chunks)[written:]
        written += os.pwrite(fd, data, offset + written)
    return written


def parse_response(response: httpx.Response) -> Response:
    """Where a 200/206 body starts, the whole file's size, its validator and digest, if the server said."""
    validator = response.headers.get("etag") or response.headers.get("last-modified")
    if validator and validator.startswith("W/"):
        validator = None  # weak validators may not guard byte ranges (RFC 9110 13.1.5)
    digest = _parse_digest(response.headers)
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if not match:
            raise RouterError(f"206 with bad Content-Range {response.headers.get('content-range')!r}")
        total = None if match.group(3) == "*" else int(match.group(3))
        return Response(int(match.group(1)), total, validator, digest)
    length = response.headers.get("content-length")
    return Response(0, int(length) if length and length.isdigit() else None, validator, digest)


def _parse_digest(headers: httpx.Headers) -> str | None:
    """A SHA-256 from `Repr-Digest: sha-256=:b64:` or `Digest: sha-256=b64`, as lowercase hex."""
    for header in ("repr-digest", "digest"):
        for part in headers.get(header, "").split(","):
            key, _, value = part.strip().partition("=")
            if key.lower() == "sha-256" and value:
                try:
                    return base64.b64decode(value.strip(":")).hex()
                except ValueError:
                    return None
    return None


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 8 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()
