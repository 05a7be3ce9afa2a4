"""What a serving daemon inherits from, and leaves to, whatever outlives it: the holder of its /dev/fuse descriptor
and state journal (systemd's file descriptor store, or modelfs's supervisor), reached by the same protocol
(`fdstore`).

A daemon started with a live connection takes it over (`take_over`) unless the connection ended meanwhile or its
state cannot be trusted; then it ends that connection and clears the mountpoint (`remount`), so that a fresh mount
follows: a clean remount with a log line, never a guess. A daemon started ahead of a planned restart waits
(`standby`) until its supervisor lets it take over. `lifecycle` is what status and metrics say of the process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Gauge, Info

from . import fdstore, fusedev, metrics, state
from .fusermount import MountError, unmount
from .state import Saved, StateError

log = logging.getLogger(__name__)

#: Exit status of a daemon that stopped to let the modelfs now installed serve its mount (EX_TEMPFAIL). The
#: supervisor starts the next one at once; systemd does with RestartForceExitStatus=75 (systemd/modelfs.service).
HANDOVER_EXIT = 75
#: How long a hand-over waits for requests in progress to be answered; the rest are resent to the next daemon.
DRAIN_SECONDS = 5.0
FUSE_NAME = "fuse"
STATE_PREFIX = "state-"

RESTARTS = Gauge("modelfs_restarts", "Times a new daemon took over this mount without unmounting it "
                 "(crashes and hand-overs).", registry=metrics.REGISTRY)
PAUSE = Gauge("modelfs_restart_pause_seconds", "How long requests waited during the last restart, from the end "
              "of the previous daemon to this one serving (0 before any restart; unknown under systemd).",
              registry=metrics.REGISTRY)
DAEMON = Info("modelfs_daemon", "The process serving the mount and what holds its connection.",
              registry=metrics.REGISTRY)


class Holder:
    """What keeps the mount's descriptors when this process dies: a service manager reached by NOTIFY_SOCKET
    (systemd, or modelfs's supervisor, which says so in MODELFSD_SUPERVISOR). Without one a crash leaves a stale
    mount, as any FUSE filesystem's would."""

    def __init__(self) -> None:
        self.present = bool(os.environ.get("NOTIFY_SOCKET"))
        pid = os.environ.get("MODELFSD_SUPERVISOR", "")
        self.supervisor = int(pid) if pid.isdigit() else 0

    @property
    def kind(self) -> str:
        return "supervisor" if self.supervisor else "service manager" if self.present else "none"

    def store(self, name: str, fd: int) -> None:
        fdstore.notify(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> None:
        fdstore.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def newest_state(fds: dict[str, list[int]]) -> tuple[int, int] | None:
    """Take the state journals out of the inherited descriptors: (generation, fd) of the newest; older ones (a
    compaction the previous daemon did not finish telling the holder about) are closed."""
    states: list[tuple[int, int]] = []
    for name in [name for name in fds if name.startswith(STATE_PREFIX)]:
        held = fds.pop(name)
        generation = name[len(STATE_PREFIX):]
        states += [(int(generation) if generation.isdigit() else -1, fd) for fd in held]
    states.sort()
    for _, fd in states[:-1]:
        os.close(fd)
    return states[-1] if states and states[-1][0] >= 0 else None


@dataclass
class TakeOver:
    """A live connection inherited from the holder, and the state that says what it knows."""

    fd: int
    saved: Saved
    state_fd: int


def take_over(mountpoint: Path, holder: Holder) -> TakeOver | None:
    """The connection this daemon is to resume, if the holder passed one; None for a fresh mount.

    A connection that ended meanwhile (unmounted while no daemon served it) is dropped quietly. One that cannot be
    resumed (state missing, truncated or tampered with, another mountpoint) is ended and its mountpoint cleared:
    a clean remount with a log line, never a guess.
    """
    fds = fdstore.inherited()
    fuse = fds.pop(FUSE_NAME, [])
    newest = newest_state(fds)
    for name, held in fds.items():  # nothing else belongs in the store
        holder.remove(name)
        for fd in held:
            os.close(fd)
    for fd in fuse[1:]:
        os.close(fd)
    if not fuse:
        if newest is not None:
            os.close(newest[1])
            holder.remove(f"{STATE_PREFIX}{newest[0]}")
        return None
    fd = fuse[0]
    try:
        if not fusedev.is_fuse_device(fd):
            raise StateError(f"the descriptor named {FUSE_NAME!r} is not /dev/fuse")
        if not fusedev.connected(fd):
            log.warning("the connection of %s ended while no daemon served it (unmounted?); mounting afresh",
                        mountpoint)
            release(fd, newest, holder)
            return None
        if newest is None:
            raise StateError("no saved state came with the connection")
        saved = state.load(newest[1])
        if saved.mountpoint != str(mountpoint):
            raise StateError(f"the state is of mount {saved.mountpoint}, not {mountpoint}")
        device = fusedev.mount_device(mountpoint)
        if device is None:
            raise StateError(f"{mountpoint} is no longer mounted (the connection only serves open files)")
        if device != saved.device:
            raise StateError(f"the mount at {mountpoint} is device {device[0]}:{device[1]}, the state's is "
                             f"{saved.device[0]}:{saved.device[1]}")
    except (StateError, OSError) as exc:
        remount(mountpoint, f"cannot resume: {exc}", fd, newest, holder)
        return None
    return TakeOver(fd, saved, newest[1])


def release(fd: int, newest: tuple[int, int] | None, holder: Holder) -> None:
    """Give up an inherited connection and its state, here and at the holder. Once nobody holds a descriptor of it,
    the kernel ends the connection: files still open on it then get ENOTCONN."""
    for name, held in ((FUSE_NAME, fd), *(((f"{STATE_PREFIX}{newest[0]}", newest[1]),) if newest else ())):
        holder.remove(name)
        try:
            os.close(held)
        except OSError:
            pass


def remount(mountpoint: Path, reason: str, fd: int, newest: tuple[int, int] | None, holder: Holder) -> None:
    """Drop a connection this daemon cannot serve and clear its mountpoint, so that a fresh mount follows."""
    log.error("%s: %s; remounting (files open on the old mount get errors; new opens work)", mountpoint, reason)
    release(fd, newest, holder)
    try:
        unmount(mountpoint, lazy=True)
    except (MountError, OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot clear %s: %s", mountpoint, exc)


def standby() -> None:
    """A daemon started ahead of a planned restart (MODELFSD_STANDBY_FD) waits here, everything imported, until
    its supervisor says go (the monotonic time the old daemon ended) or gives up (end of file: exit)."""
    fd = os.environ.pop("MODELFSD_STANDBY_FD", "")
    if not fd.isdigit():
        return
    fdstore.notify("MODELFSD_STANDBY=1")
    go = os.read(int(fd), 8)
    os.close(int(fd))
    if len(go) != 8:
        raise SystemExit(0)
    os.environ["MODELFSD_RESTART_FROM"] = str(int.from_bytes(go, "little"))


def lifecycle(holder: Holder, restarts: int, pause: float | None,
              init: tuple[bytes, bytes] | None) -> dict[str, object]:
    """What `modelfs status` shows of the process, and what `modelfs restart` needs."""
    DAEMON.info({"pid": str(os.getpid()), "held_by": holder.kind})
    RESTARTS.set(restarts)
    if pause is not None:
        PAUSE.set(pause)
    return {"pid": os.getpid(), "restarts": restarts, "held_by": holder.kind,
            "supervisor_pid": holder.supervisor or None, "started": time.time(),
            "last_restart_pause_s": None if pause is None else round(pause, 3), "state_format": state.VERSION,
            "fuse_init": [init[0].hex(), init[1].hex()] if init else None}
