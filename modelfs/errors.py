"""The errors modelfs raises to the kernel: each carries the errno a reader will see.

Policy modules raise `Failure(errno, message)`; the FUSE layer turns any exception with an integer `errno`
(Failure, OSError, names.InvalidName) into that errno and everything else into EIO, in one place. A download that
ends without a model raises `DownloadFailed`, which also says why from a fixed set (`Reason`): metrics and status
use that, never the message.
"""

from __future__ import annotations

import enum
import errno as errno_


class Failure(Exception):
    """A failure with a clear message and the errno the caller should get."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def not_found(message: str) -> Failure:
    return Failure(errno_.ENOENT, message)


class Reason(enum.Enum):
    """Why a download ended without a model. The values are metric labels and status keys: keep them stable."""

    NOT_FOUND = "not_found"  # every router that answered said 404
    STORE_FULL = "store_full"  # the store's disk (or quota) is full
    CORRUPT = "corrupt"  # the server sent something that is not the model (magic, digest)
    CHANGED = "changed"  # the server's copy changed while readers had bytes of the old one
    UNMOUNT = "unmount"  # the mount went away; the partial file is kept for next time
    ERROR = "error"  # anything else: the network, the server, the disk


class DownloadFailed(Failure):
    """A download ended without a model: the errno readers get, the message for logs and status, and why."""

    def __init__(self, err: int, message: str, reason: Reason) -> None:
        super().__init__(err, message)
        self.reason = reason
