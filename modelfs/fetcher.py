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
import heapq
import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import httpx
import trio

from .errors import Failure
from .router import NotFound, Router, RouterError, _describe, iter_body
from .store import Store, is_disk_full

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: Bytes per write and per progress report: large enough to keep syscalls and loop wake-ups cheap.
WRITE_CHUNK = 1 << 20
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


class Download:
    """One model's download, shared by every reader of it. Its attributes are only touched on the trio loop."""

    def __init__(self, name: str, fd: int, size_hint: int | None) -> None:
        self.name = name
        self.fd = fd
        self.total: int | None = size_hint
        self.progress = 0
        self.done = False
        self.error: Failure | None = None
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.written = 0  # the worker thread's own count; `progress` is the loop's copy of it
        self.start_offset = 0  # where this run began (resumed downloads), for the rate
        # Readers waiting for bytes, by the offset they need: a progress report wakes only those it satisfies,
        # not every waiter (64 readers with deep read-ahead would otherwise wake by the hundred per MiB).
        self._waiters: list[tuple[int, int, trio.Event]] = []
        self._seq = itertools.count()

    def rate(self) -> float:
        """Bytes per second since the download (re)started."""
        elapsed = time.monotonic() - self.started
        return max(self.progress - self.start_offset, 0) / elapsed if elapsed > 0 else 0.0

    def _update(self, progress: int | None = None, total: int | None = None) -> None:
        if progress is not None:
            self.progress = progress
        if total is not None:
            self.total = total
        while self._waiters and (self.done or self._waiters[0][0] <= self.progress):
            heapq.heappop(self._waiters)[2].set()

    def _finish(self, error: Failure | None) -> None:
        self.done = True
        self.error = error
        self._update()

    async def wait_for(self, end: int) -> None:
        """Return once bytes [0, end) are on disk; raise the download's error if they never will be."""
        while self.progress < end and not self.done:
            event = trio.Event()
            heapq.heappush(self._waiters, (end, next(self._seq), event))
            await event.wait()
        if self.progress < end and self.error is not None:
            raise self.error


class Fetcher:
    """Owns every download in progress, at most one per model name."""

    def __init__(self, store: Store, router: Router, retries: int, mtime_ns: int) -> None:
        self.store = store
        self.mtime_ns = mtime_ns  # what `stat` shows for a model until it is downloaded (the mount's start)
        self.completed: set[str] = set()  # downloaded by this daemon, not opened from the store since
        self.router = router
        self.retries = retries
        self.downloads: dict[str, Download] = {}
        self.failures: dict[str, str] = {}  # the last failure of each model, for status; cleared on success
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
        if download is not None:
            return download
        assert self._nursery is not None, "Fetcher.run() is not running"
        partial = self.store.partial_path(name)
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Failure(exc.errno or errno.EIO, f"cannot create {partial}: {exc.strerror}") from None
        download = Download(name, fd, size_hint)
        self.downloads[name] = download
        self.failures.pop(name, None)
        self._nursery.start_soon(self._run, download)
        return download

    async def _run(self, download: Download) -> None:
        finished = False
        try:
            await trio.to_thread.run_sync(self._fetch, download, abandon_on_cancel=True)
            finished = True
            if download.error is None:
                self.completed.add(download.name)
        finally:
            del self.downloads[download.name]
            if download.error is not None:
                self.failures[download.name] = str(download.error)
            if finished:
                os.close(download.fd)  # readers hold their own dup()s
            elif not download.done:
                download.stop.set()
                download._finish(Failure(errno.EIO, f"download of {download.name} stopped: unmounting"))

    # Everything below runs in the download's worker thread.

    def _report(self, download: Download, progress: int | None = None, total: int | None = None) -> None:
        assert self._token is not None
        self._token.run_sync_soon(download._update, progress, total)

    def _fetch(self, download: Download) -> None:
        """Fetch, verify and promote one model; report the outcome to the loop. Never raises."""
        name = download.name
        began = time.monotonic()
        fetched = 0
        error: Failure | None = None
        try:
            fetched = self._fetch_with_retries(download)
            self._verify(download)
            path = self.store.promote(name, download.fd, self.mtime_ns)
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
        assert self._token is not None
        self._token.run_sync_soon(download._finish, error)

    def _fetch_with_retries(self, download: Download) -> int:
        """Bring the partial file to its full size, resuming across failures; returns bytes fetched."""
        name = download.name
        have = os.fstat(download.fd).st_size
        sidecar = self.store.read_sidecar(name)
        if have and not sidecar:
            have = self._restart(download, "partial download without sidecar")
        if have:
            log.info("resuming download of %s at byte %d", name, have)
        download.start_offset = have
        fetched = 0
        failures = 0
        while True:
            if download.stop.is_set():
                raise Stopped
            headers = {}
            if have:
                headers["Range"] = f"bytes={have}-"
                if sidecar.get("validator"):
                    headers["If-Range"] = sidecar["validator"]
            try:
                origin = ""
                with self.router.stream(name, headers) as response:
                    origin = f"{response.url}: "
                    answer = parse_response(response)
                    if answer.start != 0 and answer.start != have:
                        raise RouterError(f"asked for byte {have}, got a body starting at {answer.start}")
                    if answer.start != have or not _same_version(sidecar, answer):
                        if have:
                            log.info("download of %s: server sent %s from byte %d; starting over from 0",
                                     name, "another version" if answer.start == have else "the whole file",
                                     answer.start)
                        have = self._restart(download, None)
                        if answer.start != 0:
                            continue  # a 206 for another version: ask again for the whole file
                        sidecar = {"total": answer.total, "validator": answer.validator, "digest": answer.digest}
                        self.store.write_sidecar(name, sidecar)
                    self._report(download, have, answer.total)
                    download.written = have
                    try:
                        self._copy(download, response)
                    finally:
                        fetched += download.written - have
                        have = download.written
                    if answer.total is not None and have < answer.total:
                        raise httpx.RemoteProtocolError(f"body ended at byte {have} of {answer.total}")
                    return fetched
            except (httpx.HTTPError, RouterError) as exc:
                failures += 1
                if failures > self.retries:
                    raise Failure(errno.EIO, f"{origin}{_describe(exc)} (gave up after "
                                  f"{failures} tries, {have} bytes kept for resume)") from None
                delay = min(0.2 * 2 ** (failures - 1), 5.0)
                log.warning("download of %s: %s%s at byte %d; retrying in %.1fs (try %d of %d)",
                            name, origin, _describe(exc), have, delay, failures + 1, self.retries + 1)
                if download.stop.wait(delay):
                    raise Stopped from None

    def _restart(self, download: Download, reason: str | None) -> int:
        if reason:
            log.info("download of %s: %s; starting from byte 0", download.name, reason)
        os.ftruncate(download.fd, 0)
        self.store.discard_sidecar(download.name)
        self._report(download, 0)
        return 0

    def _copy(self, download: Download, response: httpx.Response) -> None:
        """Append the body at `download.written` in large writes, reporting progress as it goes.

        Whatever arrived is written even when the body breaks off, so a resume never fetches it twice.
        """
        pending: list[bytes] = []
        size = 0
        try:
            for chunk in iter_body(response):
                if download.written == 0 and size == 0 and not chunk.startswith(GGUF_MAGIC[: len(chunk)]):
                    raise Corrupt(f"model {download.name!r}: router sent a file that is not GGUF "
                                  f"(starts with {chunk[:8]!r})")
                pending.append(chunk)
                size += len(chunk)
                if size >= WRITE_CHUNK:
                    self._flush(download, pending)
                    size = 0
                    if download.stop.is_set():
                        raise Stopped
        finally:
            if pending:
                self._flush(download, pending)

    def _flush(self, download: Download, pending: list[bytes]) -> None:
        download.written += _write(download.fd, pending, download.written)
        pending.clear()
        self._report(download, download.written)

    def _verify(self, download: Download) -> None:
        """The last gate before a file becomes a model: length, magic, digest."""
        sidecar = self.store.read_sidecar(download.name)
        size = os.fstat(download.fd).st_size
        total = sidecar.get("total")
        if total is not None and size != total:
            raise Failure(errno.EIO, f"model {download.name!r}: got {size} bytes, router promised {total}")
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


def _same_version(sidecar: dict[str, object], answer: Response) -> bool:
    """Whether a resumed body belongs to the same file the partial holds."""
    if answer.start == 0:
        return False  # a full body: always start over, never splice
    if sidecar.get("total") != answer.total:
        return False
    return sidecar.get("validator") == answer.validator


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
