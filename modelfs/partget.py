"""One ranged GET of one part of a download, on a stream's thread: ask, judge the answer, copy the body to disk.

The body goes from the socket into the stream's own buffer and from there to the partial file with `pwrite`:
no other copy, no allocation per chunk. Bytes readers may already have read are compared with what a new body
brings before they are written over (a server without validators gives no other proof of its version).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from . import ranged
from .errors import DownloadFailed, Reason
from .parts import Parts
from .ranged import Answer, Verdict
from .ranges import RangeSet
from .resume import ResumeRecord
from .router import Router
from .transport import Response, TransportError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: Bytes per stream's buffer: each socket read fills what is queued (at least SO_RCVLOWAT), one pwrite each.
BUFFER = 2 << 20


class Stopped(Exception):
    """The mount is going away; the partial download is kept for next time."""


class Restart(Exception):
    """The server's copy is not the one the partial file holds (validator, size, or a 200 to a ranged request)."""


class Corrupt(DownloadFailed):
    """The router sent something that is not the model; the partial file is worthless."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message, Reason.CORRUPT)


class Changed(DownloadFailed):
    """The server's copy changed while readers may already have read bytes of the old one: those readers must
    never get bytes of the new one, so this download fails (EIO for what they have not read) and its partial
    file goes; the next open starts a new download in a new file, which is a new inode in the mount."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(errno.EIO, f"model {name!r} changed on the server during the download ({why}); readers "
                         "of the old bytes get EIO, the next open downloads the new version", Reason.CHANGED)


class PartGet:
    """The GETs of one download's parts, shared by its streams.

    `answered` and `parallel` are decided by the first answer of a run; only one stream runs before it, and the
    coordinator resets them (`new_run`) when no stream runs, so they need no lock. `connections` is under `_lock`.
    """

    buffer_size = BUFFER

    def __init__(self, name: str, fd: int, router: Router, parts: Parts, record: ResumeRecord,
                 wake: Callable[[], None]) -> None:
        self.name = name
        self.fd = fd
        self.router = router
        self.parts = parts
        self.record = record
        self.wake = wake
        self.answered = False  # the first answer of this run came
        self.parallel = False  # ...and it was a 206 with the size, not from a filling cache: more streams may start
        self.connections = 0  # connections opened (not reused) for this download
        self._lock = threading.Lock()

    def new_run(self) -> None:
        self.answered = self.parallel = False

    def fetch(self, part: int, buffer: memoryview, running: Callable[[], None]) -> None:
        """One GET for what is left of a part, ranged, guarded by If-Range once a validator is known."""
        parts = self.parts
        start, end = parts.span(part)
        version = self.record.version
        to_end = end is None or end == parts.total  # ask open-ended: the body is exactly the part either way
        headers = ranged.request_headers(start, None if to_end else end, version.validator if version else None)
        with self.router.stream(self.name, headers) as response:
            if not response.reused:
                with self._lock:
                    self.connections += 1
            answer = ranged.parse(response.status, response.headers)
            verdict, why = ranged.judge(answer, start, version)
            if verdict is Verdict.NEW_VERSION:
                raise Restart(why)
            if verdict is Verdict.WHOLE:
                self._whole(part, answer)
            elif not self.answered:  # the first 206: the server honours ranges, and now the size is known
                if version is None:
                    self.record.begin(answer.version)
                parts.set_total(answer.version.total, part, start)
                # A cache still filling from the origin gets one stream, its parts one after another: a fleet's
                # nodes must not pile parallel parts onto the one fill. A warm cache gets parallel parts.
                filling = ranged.cache_filling(response.headers)
                if filling:
                    log.info("download of %s: the cache says it is still filling from the origin; one stream",
                             self.name)
                self.parallel = answer.version.total is not None and not filling
            self.answered = True
            if not parts.confirmed and parts.confirm():  # resumed bytes are of the server's version: readable
                self.wake()
            position, end = parts.span(part)
            self._copy(part, response, position, end, buffer, running)
            position = parts.span(part)[0]
            if end is not None and position < end:
                raise TransportError(f"{response.url}: body ended at byte {position} of {end}")

    def _whole(self, part: int, answer: Answer) -> None:
        """A 200: one stream takes the whole body from byte 0 (a server without Range, or a new version)."""
        if self.parallel:
            raise Restart("the server sent the whole file to a ranged request (a new version?)")
        parts, total = self.parts, answer.version.total
        if parts.progress() or self.record.version:
            log.info("download of %s: server sent the whole file; starting over from byte 0", self.name)
        if parts.seen(0, 1 << 62):
            # Readers may have read bytes of the first run: keep them, and `_write` checks that the new body
            # repeats them (a server without validators gives no other proof).
            if total != parts.total:
                raise Changed(self.name, f"size {total}, was {parts.total}")
        else:
            self.record.restart(None)
            parts.reset(total, RangeSet())
        parts.set_span(part, 0, total)
        self.record.begin(answer.version)

    def _copy(self, part: int, response: Response, position: int, end: int | None, buffer: memoryview,
              running: Callable[[], None]) -> None:
        """Read the body into `buffer` and write it at `position`, up to `end`, each read as it arrives (so a
        retry never fetches twice what a broken body brought)."""
        while end is None or position < end:
            got = response.readinto(buffer if end is None else buffer[:end - position])
            if not got:
                return
            data = buffer[:got]
            if position < len(GGUF_MAGIC) and data[:len(GGUF_MAGIC) - position] != GGUF_MAGIC[position:position + got]:
                raise Corrupt(f"model {self.name!r}: router sent a file that is not GGUF "
                              f"(starts with {bytes(data[:8])!r})")
            self._write(part, data, position)
            position += got
            running()

    def _write(self, part: int, data: memoryview, position: int) -> None:
        end = position + len(data)
        for start, stop in self.parts.seen(position, end):
            if os.pread(self.fd, stop - start, start) != data[start - position:stop - position]:
                raise Changed(self.name, f"bytes {start}-{stop - 1} differ from the ones already served")
        written = 0
        while written < len(data):  # short writes happen only near a full disk: finish or raise ENOSPC
            written += os.pwrite(self.fd, data[written:], position + written)
        if self.parts.wrote(part, position, end):
            self.wake()
