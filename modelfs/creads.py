"""Reads answered in C: which open files the patched pyfuse3 serves without a Python call per read request.

A handle of a complete local file (the store, a finished download) is registered with the file's descriptor at
open and cleared at release, before the descriptor can be closed; pyfuse3 then answers its reads with libfuse's
`fuse_reply_data` from that descriptor (spliced into /dev/fuse). Shared files never are: their reads may hang
and must stay in worker threads. A pyfuse3 without the project's patch 0005 leaves every read to Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyfuse3

if TYPE_CHECKING:
    from .readers import Reader

#: pyfuse3 with patches/pyfuse3/0005; its additions are not in the stubs of an unpatched pyfuse3.
_lib: Any = pyfuse3


def available() -> bool:
    return all(hasattr(pyfuse3, name) for name in ("set_read_fd", "clear_read_fd", "c_answers"))


class CReads:
    """The handles whose reads pyfuse3 answers in C."""

    def __init__(self) -> None:
        self.enabled = available()
        self._handles: set[int] = set()

    def register(self, fh: int, reader: Reader) -> bool:
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
    """Requests pyfuse3 answered in C (reads, their bytes, getxattr of foreign names); zeros without the patch."""
    if not available():
        return {"reads": 0, "read_bytes": 0, "xattr_enodata": 0}
    return {str(k): int(v) for k, v in _lib.c_answers().items()}
