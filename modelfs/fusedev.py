"""The few /dev/fuse wire-protocol facts modelfs needs outside libfuse: resending requests, connection checks, and
answering requests with an error (a mount whose daemon cannot be started fails fast instead of hanging).

Pure Python on purpose: the supervisor uses it without loading pyfuse3 or trio. Layouts are those of
include/uapi/linux/fuse.h (little-endian hosts, as everywhere modelfs runs).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: /dev/fuse is character device 10:229.
FUSE_DEVICE = (10, 229)
#: struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: struct fuse_out_header: len, error, unique. A notification has unique 0 and its code in `error`.
OUT_HEADER = struct.Struct("<IiQ")
#: struct fuse_init_in: major, minor, max_readahead, flags, flags2 (then unused words).
INIT_IN = struct.Struct("<IIIII")
FUSE_INIT = 26
FUSE_FORGET = 2
FUSE_BATCH_FORGET = 42
FUSE_INTERRUPT = 36
FUSE_GETXATTR = 22
FUSE_GETATTR = 3
#: struct fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then struct fuse_attr: ino, size, blocks, atime,
#: mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags.
ATTR_OUT = struct.Struct("<QII" + "QQQQQQ" + "III" + "IIIIIII")
FUSE_NOTIFY_RESEND = 7
#: FUSE_INIT flags2 bit: the kernel can resend requests (FUSE_HAS_RESEND, Linux >= 6.9).
HAS_RESEND = 1 << (39 - 32)
#: Requests that get no reply.
NO_REPLY = (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT)
#: Large enough for any request on a read-only mount (the kernel wants room for max_write plus headers).
READ_BUFFER = 1 << 22


def is_fuse_device(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == FUSE_DEVICE


def connected(fd: int) -> bool:
    """Whether the connection behind a /dev/fuse descriptor is still up (poll says POLLERR once it is not)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0))


def kernel_resends(init_request: bytes) -> bool:
    """Whether the kernel that sent this FUSE_INIT request can resend requests (FUSE_NOTIFY_RESEND)."""
    if len(init_request) < IN_HEADER.size + INIT_IN.size:
        return False
    major, minor, _, _, flags2 = INIT_IN.unpack_from(init_request, IN_HEADER.size)
    return major == 7 and minor >= 40 and bool(flags2 & HAS_RESEND)


def resend(fd: int) -> None:
    """Ask the kernel to send again every request a previous reader of this connection took but never answered.

    OSError (EINVAL) on kernels without FUSE_NOTIFY_RESEND.
    """
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))


def mount_device(mountpoint: Path) -> tuple[int, int] | None:
    """(major, minor) of the FUSE mount at `mountpoint` in /proc/self/mountinfo; its minor is the connection's
    number under /sys/fs/fuse/connections. Never touches the mount itself (a mount nobody serves would hang)."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == str(mountpoint) and " - fuse" in line:
                    major, _, minor = fields[2].partition(":")
                    found = (int(major), int(minor))
    except (OSError, ValueError):
        return None
    return found


def answer(fd: int, buffer: bytearray, err: int, xattr: Callable[[int, bytes], bytes | None]) -> bool:
    """Read one request and answer it with `-err`, except the root's attributes (a read-only directory) and a
    getxattr for which `xattr(nodeid, name)` gives a value: so `modelfs status` can say why the mount fails.
    False once the connection has ended."""
    try:
        size = os.readv(fd, [buffer])
    except OSError as exc:
        if exc.errno == errno.ENODEV:  # unmounted or aborted
            return False
        if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
            return True
        raise
    if size < IN_HEADER.size:
        return True
    _, opcode, unique, nodeid, _, _, _, _, _ = IN_HEADER.unpack_from(buffer)
    if opcode in NO_REPLY:
        return True
    reply = OUT_HEADER.pack(OUT_HEADER.size, -err, unique)
    if opcode == FUSE_GETATTR and nodeid == 1:  # the root stays a directory, so its xattrs can be read
        now = int(time.time())
        attr = ATTR_OUT.pack(1, 0, 0, 1, 0, 0, now, now, now, 0, 0, 0, stat.S_IFDIR | 0o555, 2, os.getuid(),
                             os.getgid(), 0, 4096, 0)
        reply = OUT_HEADER.pack(OUT_HEADER.size + len(attr), 0, unique) + attr
    elif opcode == FUSE_GETXATTR:
        body = bytes(buffer[IN_HEADER.size:size])
        value = xattr(nodeid, body[8:].split(b"\0", 1)[0]) if len(body) > 8 else None
        if value is not None:
            reply = _xattr_reply(unique, struct.unpack_from("<I", body)[0], value)
    try:
        os.write(fd, reply)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return False
        # ENOENT: the request was interrupted meanwhile
    return True


def _xattr_reply(unique: int, wanted: int, value: bytes) -> bytes:
    """To struct fuse_getxattr_in's size 0: the value's size (struct fuse_getxattr_out); else the value."""
    if wanted == 0:
        payload = struct.pack("<II", len(value), 0)
    elif wanted < len(value):
        return OUT_HEADER.pack(OUT_HEADER.size, -errno.ERANGE, unique)
    else:
        payload = value
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload
