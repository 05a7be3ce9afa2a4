"""The identity of one version of a model file, and when equal identities prove the same file.

A version is what `stat` says of the file: device, inode, size and mtime. `inodes` gives each identity its own
inode, so the kernel never mixes the pages of two versions; this module only says what an identity is and when it
can be trusted. Pure: no I/O beyond the clock.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

#: A file changed within this long may change again without its identity showing it (network filesystems with
#: whole-second mtimes and path-based inode numbers, like sshfs): its identity proves nothing until then ("racily
#: clean", as git calls it). The store is a local filesystem with nanosecond mtimes and real inodes.
STABLE_AFTER_NS = 2_000_000_000


class Identity(NamedTuple):
    """What must stay equal for two looks at a model to be the same file (and its cached pages still valid)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def settled(mtime_ns: int, now_ns: int | None = None) -> bool:
    """Whether a file last changed at `mtime_ns` has been left alone long enough for its identity to prove it."""
    return (time.time_ns() if now_ns is None else now_ns) - mtime_ns > STABLE_AFTER_NS
