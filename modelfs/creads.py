"""Reads answered in C: which open files the patched pyfuse3 serves without a Python call per read request, and
the replies Python makes from a file rather than from its own buffer.

A handle of a complete local file (the store, a finished download) is registered with the file's descriptor at
open and cleared at release, before the descriptor can be closed; pyfuse3 then answers its reads with libfuse's
`fuse_reply_data` from that descriptor (spliced into /dev/fuse). A read of a download in progress is answered in
Python once its bytes are on disk, with a `FileRange` of the partial file that pyfuse3 replies from the same way
(patch 0006). Shared files never take either: their reads may hang and must stay in worker threads. A pyfuse3
without the project's patches 0005 and 0006 leaves every read, and its bytes, to Python.
"""

from __future__ import annotations

from typing import Any, Protocol

import pyfuse3

#: pyfuse3 with patches/pyfuse3/0005; its additions are not in the stubs of an unpatched pyfuse3.
_lib: Any = pyfuse3


def available() -> bool:
    return all(hasattr(pyfuse3, name) for name in ("set_read_fd", "clear_read_fd", "c_answers"))


class FileRange(Protocol):
    """`pyfuse3.FdRange`: what a read handler returns to have `size` bytes of `fd` at `offset` replied in C."""

    fd: int
    offset: int
    size: int


_ranges = hasattr(pyfuse3, "FdRange")


def file_range(fd: int, offset: int, size: int) -> FileRange | None:
    """A reply of `size` bytes of `fd` at `offset`, made by pyfuse3 from the file (spliced: the bytes never enter
    Python); None without patch 0006. The reply is made before any other task runs, so `fd` need only be open now;
    it is read on the trio loop, so only a local file's range."""
    return _lib.FdRange(fd, offset, size) if _ranges else None


class CReadable(Protocol):
    """What `register` asks of a reader (`readers.Reader`, named here so that this module imports no reader)."""

    def c_read(self) -> tuple[int, int] | None: ...


class CReads:
    """The handles whose reads pyfuse3 answers in C."""

    def __init__(self) -> None:
        self.enabled = available()
        self._handles: set[int] = set()

    def register(self, fh: int, reader: CReadable) -> bool:
        """Serve `fh`'s reads in C if its reader allows it; whether it does."""
        target = reader.c_read() if self.enabled else None
        if target is None:
            return False
        fd, drop_behind = target
        _lib.set_read_fd(fh, fd, drop_behind)
        self._handles.add(fh)
        return True

    def unregister(self, fh: int) -> None:
        """Before the handle's descriptor may be closed: reads of `fh` (none should come) go to Python again."""
        if fh in self._handles:
            self._handles.discard(fh)
            _lib.clear_read_fd(fh)


def counts() -> dict[str, int]:
    """Requests pyfuse3 answered in C (reads, their bytes, getxattr of foreign names) and the replies it made from
    a `FileRange` (`range_replies`, `range_bytes`); zeros without the patches."""
    zeros = {"reads": 0, "read_bytes": 0, "xattr_enodata": 0, "range_replies": 0, "range_bytes": 0}
    if not available():
        return zeros
    return zeros | {str(k): int(v) for k, v in _lib.c_answers().items()}
