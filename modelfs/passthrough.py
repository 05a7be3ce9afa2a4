"""FUSE passthrough: the kernel reads and maps a model's backing file itself; the daemon only answers the open.

Owns the mode (`auto`, `on`, `off`) and why it ended up active or not, the two /dev/fuse ioctls that register a
backing file with the kernel, and which backing filesystems can serve a passthrough open fully (mmap included).
It needs a kernel that offers it (Linux >= 6.9), CAP_SYS_ADMIN, libfuse >= 3.17.1 and a pyfuse3 with the
project's patch (patches/pyfuse3), which adds `FileInfo.backing_id`, `Operations.enable_passthrough`,
`passthrough_granted()` and `session_fd()`. Which backing file each inode uses is `inodes`' business.

When the kernel refuses one file, only a cause that is about its filesystem (it cannot map files shared, or
refuses them as backing files: ELOOP, EOPNOTSUPP, EPERM) sends that filesystem's files to the daemon path for the
rest of the mount; any other (ENOMEM, EMFILE...) only that open. Each fallback is logged, counted by cause and
shown by `user.modelfs.io`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
from typing import Any

import pyfuse3

from . import metrics
from .readers import Reader

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
#: pyfuse3 with the passthrough patch; its additions are not in pyfuse3's type stubs.
_lib: Any = pyfuse3
_CAP_SYS_ADMIN = 21


def _iow(kind: int, number: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (kind << 8) | number


#: struct fuse_backing_map { int32_t fd; uint32_t flags; uint64_t padding; } -> backing id (linux/fuse.h).
BACKING_OPEN = _iow(229, 1, 16)
#: uint32_t backing id.
BACKING_CLOSE = _iow(229, 2, 4)

#: BACKING_OPEN errors that are about the backing filesystem (or the whole connection), not one file: its files
#: take the daemon path for the rest of the mount. ELOOP: filesystems stacked too deep; EPERM: the connection
#: refuses backing files.
FILESYSTEM_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ELOOP, errno.EPERM})
#: Fault injection for tests: BACKING_OPEN fails with these errno names, one per call, before it is really issued.
TEST_ERRNOS_VARIABLE = "MODELFS_TEST_BACKING_OPEN_ERRNOS"


class PassthroughUnavailable(Exception):
    """`--passthrough on` but it cannot be had; the message says why."""


def library_supports() -> bool:
    return all(hasattr(pyfuse3, attr) for attr in ("passthrough_granted", "session_fd")) and hasattr(
        pyfuse3.FileInfo(), "backing_id")


def file_info(fh: int, keep_cache: bool, backing_id: int) -> pyfuse3.FileInfo:
    """The open reply: passthrough when `backing_id` is set (libfuse then adds FOPEN_PASSTHROUGH)."""
    info: Any = pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)
    if backing_id:
        info.backing_id = backing_id
    return info  # type: ignore[no-any-return]


def has_cap_sys_admin() -> bool:
    """Whether this process may register backing files (the ioctl checks CAP_SYS_ADMIN in the init namespace)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


class Passthrough:
    """The mount's passthrough state: asked for before FUSE_INIT, settled after it."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"passthrough mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.active = False
        self.reason = self._obstacle() or "waiting for the kernel's FUSE_INIT"
        self._fd = -1
        self._mmap_ok: dict[int, bool] = {}  # by st_dev: whether the backing filesystem serves a shared mmap
        self._refused: dict[int, tuple[str, int | None]] = {}  # by st_dev: why its files take the daemon path, errno
        self._faults = [getattr(errno, name.strip()) for name in os.environ.get(TEST_ERRNOS_VARIABLE, "").split(",")
                        if name.strip()]

    def _obstacle(self) -> str | None:
        if self.mode == "off":
            return "off by configuration"
        if not library_supports():
            return "this pyfuse3 has no passthrough support (install with scripts/setup or scripts/build-fuse)"
        if not has_cap_sys_admin():
            return "needs CAP_SYS_ADMIN (run modelfs as root)"
        return None

    @property
    def wanted(self) -> bool:
        """Whether to ask the kernel for passthrough in FUSE_INIT."""
        return self._obstacle() is None

    def check(self) -> None:
        """Before mounting: `on` refuses to start when passthrough cannot work."""
        obstacle = self._obstacle()
        if self.mode == "on" and obstacle:
            raise PassthroughUnavailable(f"passthrough is on but unavailable: {obstacle}")

    def settle(self) -> None:
        """In the FUSE_INIT handler, before any other request: whether the kernel granted it. Logs the mode once."""
        if self.wanted:
            if _lib.passthrough_granted():
                self.active = True
                self._fd = _lib.session_fd()
                self.reason = "kernel, privileges and library allow it"
            else:
                self.reason = "the kernel does not offer FUSE passthrough (needs Linux >= 6.9)"
        log.info("passthrough %s (mode %s): %s", "active" if self.active else "inactive, daemon read path",
                 self.mode, self.reason)

    def require(self) -> None:
        """After FUSE_INIT: `on` ends the mount when the kernel did not grant it."""
        if self.mode == "on" and not self.active:
            raise PassthroughUnavailable(f"passthrough is on but unavailable: {self.reason}")

    async def register(self, reader: Reader) -> tuple[int, str]:
        """(backing id, "") for the reader's file, or (0, why not) when the daemon serves it although passthrough
        is active; (0, "") when the daemon serves it by design (passthrough off, a download in progress)."""
        if not self.active or not reader.complete:
            return 0, ""
        dev = reader.identity.dev
        ok = self._mmap_ok.get(dev)
        if ok is None:
            ok = self._mmap_ok[dev] = await reader.call(_serves_shared_mmap, reader.fd, reader.identity.size)
            if not ok:
                self._refused[dev] = ("filesystem cannot map files shared", None)
                log.warning("%s: its filesystem cannot map files shared (e.g. sshfs -o direct_io); files there use "
                            "the daemon read path", reader.path)
        refused = self._refused.get(dev)
        if refused is not None:
            metrics.PASSTHROUGH_FALLBACKS.labels(cause=metrics.fallback_cause(refused[1])).inc()
            return 0, refused[0]
        buf = bytearray(struct.pack("iIQ", reader.fd, 0, 0))
        try:
            if self._faults:
                err = self._faults.pop(0)
                raise OSError(err, os.strerror(err))
            backing_id = fcntl.ioctl(self._fd, BACKING_OPEN, buf, True)  # mutable buffer: returns the id
        except OSError as exc:
            return 0, self._refuse(reader, dev, exc.errno or errno.EIO)
        return int(backing_id), ""

    def _refuse(self, reader: Reader, dev: int, err: int) -> str:
        name = errno.errorcode.get(err, str(err))
        if err in FILESYSTEM_ERRNOS:
            why = f"backing files refused: {name}"
            self._refused[dev] = (why, err)
            log.warning("%s: the kernel refuses files of its filesystem as passthrough backing files (%s); the "
                        "daemon serves every file there for the rest of the mount", reader.path, os.strerror(err))
        else:
            why = f"backing open failed: {name}"
            log.warning("%s: the kernel refused it as a passthrough backing file (%s); the daemon serves this open "
                        "file, passthrough stays on for the others", reader.path, os.strerror(err))
        metrics.PASSTHROUGH_FALLBACKS.labels(cause=metrics.fallback_cause(err)).inc()
        return why

    def expected_io(self, dev: int | None, complete: bool) -> str:
        """How the next open of a file on device `dev` would be served (`user.modelfs.io` with no handle open)."""
        if not self.active or not complete:
            return "daemon"
        refused = self._refused.get(dev) if dev is not None else None
        return f"daemon ({refused[0]})" if refused else "passthrough"

    def unregister(self, backing_id: int) -> None:
        """Drop the kernel's registration; open passthrough files keep their own reference to the backing file."""
        try:
            fcntl.ioctl(self._fd, BACKING_CLOSE, struct.pack("I", backing_id))
        except OSError as exc:
            log.warning("cannot release passthrough backing id %d: %s", backing_id, os.strerror(exc.errno or 0))


def _serves_shared_mmap(fd: int, size: int) -> bool:
    """A passthrough mmap is the backing file's own: it fails wherever a shared mapping of that file fails."""
    try:
        mmap.mmap(fd, min(size, mmap.PAGESIZE), access=mmap.ACCESS_READ).close()
    except (OSError, ValueError):
        return False
    return True
