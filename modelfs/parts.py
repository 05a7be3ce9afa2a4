"""Which bytes of a download go next, and on how many streams.

`Parts` is the part scheduler: what is on disk, which parts are in flight, where readers wait; readers' offsets
steer which part starts next. It is shared by the trio loop (readers) and the download's threads under one lock,
held only for a few list operations, so the loop never waits on it for long. `Growth` decides how many streams
run: more only while more streams bring more bytes per second. Neither does any I/O.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from .ranges import RangeSet

#: A part started for a reader begins at the reader's offset rounded down to this.
ALIGN = 1 << 20


@dataclass
class Part:
    """Bytes [start, end) being fetched by one stream; `end` None: to the end of a body of unknown size."""

    start: int
    pos: int  # the next byte to write
    end: int | None


class Parts:
    """A download's bytes. A part never overlaps bytes on disk or in another part."""

    def __init__(self, part_size: int) -> None:
        self.lock = threading.Lock()
        self.part_size = part_size
        self.total: int | None = None
        self.done = RangeSet()  # on disk: what readers may read once `confirmed`
        self.confirmed = False  # the server's answer proved the bytes on disk are of its version
        self.fetched = 0  # bytes written in this run
        self._flight: dict[int, Part] = {}
        self._wanted: list[int] = []  # offsets readers wait at, most recent last: steers claim()
        self._waiting: dict[tuple[int, int], int] = {}  # ranges readers wait for → how many readers
        self._ready: set[tuple[int, int]] = set()  # waited ranges on disk now, not yet handed to the loop
        self._ids = itertools.count()

    def reset(self, total: int | None, done: RangeSet) -> None:
        with self.lock:
            self.total = total
            self.done = done
            for part in self._flight.values():
                part.start = part.pos = 0

    def progress(self) -> int:
        """Bytes on disk (parts fill out of order: how many, not up to where)."""
        with self.lock:
            return self.done.size

    def covers(self, start: int, end: int) -> bool:
        """Whether readers may read [start, end): resumed bytes only once the server confirmed their version."""
        with self.lock:
            return self.confirmed and self.done.covers(start, end)

    def seen(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pieces of [start, end) readers may already have read: a new body must repeat them byte for byte."""
        with self.lock:
            if not self.confirmed:
                return []
            pieces, at = [], start
            for gap_start, gap_end in [*self.done.gaps(start, end), (end, end)]:
                if at < gap_start:
                    pieces.append((at, gap_start))
                at = max(at, gap_end)
            return pieces

    def confirm(self) -> bool:
        """The server's answer matched what is on disk; True if that lets a waiting reader go."""
        with self.lock:
            self.confirmed = True
            return self._mark_ready(list(self._waiting))

    def wait(self, offset: int, end: int) -> bool:
        """A reader will wait for [offset, end), unless it may read it already (True: nothing registered). The
        check and the registration are one step under the lock, so no write can fall between them unnoticed.
        The next part to start covers `offset`, unless one in flight does."""
        with self.lock:
            if self.confirmed and self.done.covers(offset, end):
                return True
            self._waiting[offset, end] = self._waiting.get((offset, end), 0) + 1
            if offset not in self._wanted:
                self._wanted = [*self._wanted[-15:], offset]
            return False

    def unwait(self, offset: int, end: int) -> None:
        """A reader that waited for [offset, end) went away without being woken (it was cancelled)."""
        with self.lock:
            left = self._waiting.get((offset, end), 0) - 1
            if left > 0:
                self._waiting[offset, end] = left
            else:
                self._waiting.pop((offset, end), None)
                self._ready.discard((offset, end))

    def take_ready(self) -> set[tuple[int, int]]:
        """The waited ranges that are on disk now (each reader waiting for one may go); they are waited no more."""
        with self.lock:
            ready, self._ready = self._ready, set()
            for key in ready:
                self._waiting.pop(key, None)
            return ready

    def _mark_ready(self, candidates: list[tuple[int, int]]) -> bool:
        new = [key for key in candidates if key not in self._ready and self.done.covers(*key)]
        self._ready.update(new)
        return bool(new)

    def claim(self) -> int | None:
        """A new part to fetch, or None when every byte is on disk or in flight.

        The lowest offset a reader waits at first (the kernel's read-ahead asks for several MiB ahead at once: the
        lowest one's part covers the others), else the lowest missing bytes. A reader at the end gets the next
        free stream, while one at byte 0 streams on in its part.
        """
        with self.lock:
            if self.total is None:  # unknown size: one stream, from the first missing byte to the end
                return None if self._flight else self._add(self.done.prefix(), None)
            taken = RangeSet(self.done)
            for part in self._flight.values():
                taken.add(part.start, self.total if part.end is None else part.end)
            gaps = taken.gaps(0, self.total)
            if not gaps:
                return None
            start, limit = gaps[0]
            while self._wanted:
                offset = min(self._wanted)
                self._wanted.remove(offset)
                gap = next(((s, e) for s, e in gaps if s <= offset < e), None)
                if gap is not None:
                    start, limit = max(gap[0], offset - offset % ALIGN), gap[1]
                    break
            return self._add(start, min(limit, start + self.part_size))

    def _add(self, start: int, end: int | None) -> int:
        part = next(self._ids)
        self._flight[part] = Part(start, start, end)
        return part

    def span(self, part: int) -> tuple[int, int | None]:
        """(next byte, end) of a part."""
        with self.lock:
            p = self._flight[part]
            return p.pos, p.end

    def set_span(self, part: int, start: int, end: int | None) -> None:
        """The server decided: a 200 brings the whole file from byte 0, a first 206 tells the size."""
        with self.lock:
            self._flight[part] = Part(start, start, end)

    def set_total(self, total: int | None, part: int, start: int) -> None:
        """The first answer told the size: the first part, asked to the end, becomes a part like the others."""
        with self.lock:
            self.total = total
            if total is not None:
                end = self._flight[part].end
                self._flight[part] = Part(start, start, min(end or total, total, start + self.part_size))

    def wrote(self, part: int, start: int, end: int) -> bool:
        """Bytes [start, end) of a part are on disk; True if that lets a waiting reader go (`take_ready` says who)."""
        with self.lock:
            self.done.add(start, end)
            self._flight[part].pos = end
            self.fetched += end - start
            return self.confirmed and self._mark_ready([k for k in self._waiting if k[0] < end and start < k[1]])

    def release(self, part: int) -> None:
        with self.lock:
            self._flight.pop(part, None)

    def snapshot(self) -> RangeSet:
        with self.lock:
            return RangeSet(self.done)

    def in_flight(self) -> list[list[int]]:
        """[start, next byte, end] of each part being fetched (end -1: unknown), for status."""
        with self.lock:
            return sorted([p.start, p.pos, -1 if p.end is None else p.end] for p in self._flight.values())


#: The streams added last must raise the throughput by at least this share of what they ideally add.
GAIN = 0.25


class Growth:
    """How many streams fetch a download: one at first, then twice as many each `window` seconds while the streams
    added last raised the throughput by at least GAIN of what they ideally add (k more streams over n: k/n). When
    they do not, they are retired and the count stays where it was: one stream where one fills the link (or the
    CPU), up to `limit` where each connection is capped, as TCP's slow start grows its window. The transfer feeds it
    the clock and the bytes fetched."""

    def __init__(self, limit: int, window: float = 0.5) -> None:
        self.limit = max(1, limit)
        self.window = window
        self.target = 1
        self.settled = self.limit == 1
        self.rates: list[float] = []  # the throughput measured with each count tried, for the log
        self._before = 1  # the count before the last growth
        self._mark: tuple[float, int] | None = None

    def sample(self, now: float, fetched: int) -> int:
        """The number of streams to run now, given the clock and the bytes fetched so far."""
        if self.settled:
            return self.target
        if self._mark is None:
            self._mark = (now, fetched)
            return self.target
        began, before = self._mark
        if now - began < self.window:
            return self.target
        rate = (fetched - before) / (now - began)
        self._mark = (now, fetched)
        added = self.target - self._before
        paid = not self.rates or rate >= self.rates[-1] * (1 + GAIN * added / self._before)
        self.rates.append(rate)
        if not paid:
            self.target = self._before  # the streams added last brought too little: retire them
            self.settled = True
        elif self.target >= self.limit:
            self.settled = True
        else:
            self._before = self.target
            self.target = min(self.limit, 2 * self.target)
        return self.target
