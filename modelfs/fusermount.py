"""Unmounting, and recognising a mount left behind by a dead daemon, with the system's tools.

No pyfuse3 here: the supervisor and `modelfs umount` use it without loading the FUSE stack.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path


class MountError(Exception):
    """The mount cannot start; the message is the one line an admin needs."""


def is_stale(mountpoint: Path) -> bool:
    """A mountpoint left behind by a dead FUSE daemon answers ENOTCONN (statfs: the kernel never caches it)."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount a FUSE mount (ours or a stale one); MountError with the tool's message on failure."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u"] if tool else ["umount"]
    if lazy:
        command.append("-z" if tool else "-l")
    result = subprocess.run([*command, str(mountpoint)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise MountError(result.stderr.strip() or f"{' '.join(command)} failed")
