"""The errors modelfs raises to the kernel: each carries the errno a reader will see.

Policy modules raise `Failure(errno, message)`; the FUSE layer turns any exception with an integer `errno`
(Failure, OSError, names.InvalidName) into that errno and everything else into EIO, in one place.
"""

from __future__ import annotations

import errno as errno_


class Failure(Exception):
    """A failure with a clear message and the errno the caller should get."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def not_found(message: str) -> Failure:
    return Failure(errno_.ENOENT, message)
