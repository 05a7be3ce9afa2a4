"""A set of byte ranges: which bytes of a partial download are on disk, with parts filling out of order.

Sorted, disjoint, non-adjacent half-open intervals [start, end); every operation is a bisect plus a small splice,
so a set stays a handful of intervals long (one per part in flight) however large the file.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class RangeSet:
    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def size(self) -> int:
        """Bytes covered."""
        return sum(e - s for s, e in self)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Every interval that overlaps or touches [start, end) merges into it.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of [start, end) is in the set (an empty range always is)."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set, in order."""
        missing = []
        position = start
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while position < end and i < len(self._starts):
            if self._ends[i] > position:
                if self._starts[i] > position:
                    missing.append((position, min(self._starts[i], end)))
                position = max(position, self._ends[i])
            i += 1
        if position < end:
            missing.append((position, end))
        return missing

    def prefix(self) -> int:
        """Where the run of bytes from offset 0 ends (0 if byte 0 is missing)."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0
