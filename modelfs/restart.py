"""`modelfs restart MOUNTPOINT`: the planned hand-over of a live mount to the modelfs installed now (an upgrade).

It reads the serving daemon's status (its pid, what holds its connection, the recorded FUSE_INIT), refuses if the
installed pyfuse3 and modelfs would answer that FUSE_INIT differently (the running daemon is left alone), then
asks for the restart: SIGUSR1 to the supervisor, which starts the new daemon first and lets the old one drain and
hand over; or, under systemd, SIGUSR1 to the daemon itself, which drains and exits 75 for systemd to start the
new one (RestartForceExitStatus=75). Only root (or the mount's owner) can signal those processes; the hand-over
itself happens between them and their holder: the command never touches the connection.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

POLL = 0.1


def _status(mountpoint: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(os.getxattr(mountpoint, "user.modelfs.status"))
    except (OSError, ValueError):
        return None
    return data


def _is_modelfs(pid: int) -> bool:
    try:
        return b"modelfs" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _fail(message: str) -> int:
    print(f"modelfs: {message}", file=sys.stderr)
    return 1


def cmd_restart(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.absolute()
    status = _status(mountpoint)
    if status is None:
        return _fail(f"{mountpoint} is not a running modelfs mount")
    if status.get("state") == "failed":  # the supervisor answers for a mount whose daemon it gave up on
        target, old_pid = int(status["supervisor_pid"]), None
    else:
        old_pid = status.get("pid")
        holder = status.get("held_by")
        if not isinstance(old_pid, int) or holder not in ("supervisor", "service manager"):
            return _fail(f"nothing holds the connection of {mountpoint} (mounted with --no-supervisor?): a restart "
                         "would unmount it; unmount and mount it again instead")
        init = status.get("fuse_init")
        if not (isinstance(init, list) and len(init) == 2):
            return _fail(f"the daemon of {mountpoint} is still starting; try again in a moment")
        from .mount import negotiation_difference
        from .state import VERSION

        if status.get("state_format") != VERSION:
            return _fail(f"not restarted: the running daemon keeps its restart journal in format "
                         f"{status.get('state_format')}, the installed modelfs reads format {VERSION}; the running "
                         "daemon goes on. Unmount and mount again to use the new version.")

        active = bool((status.get("passthrough") or {}).get("active"))
        difference = negotiation_difference(bytes.fromhex(init[0]), bytes.fromhex(init[1]), active)
        if difference is not None:
            return _fail(f"not restarted: the installed modelfs would answer the kernel's FUSE_INIT "
                         f"differently ({difference}), so it cannot take this mount over; the running daemon "
                         "goes on. Unmount and mount again to use the new version.")
        target = int(status["supervisor_pid"]) if holder == "supervisor" else old_pid
    if not _is_modelfs(target):
        return _fail(f"pid {target} is not a modelfs process")
    restarts = int(status.get("restarts") or 0)
    try:
        os.kill(target, signal.SIGUSR1)
    except OSError as exc:
        return _fail(f"cannot signal pid {target}: {exc.strerror}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(POLL)
        now = _status(mountpoint)
        if now and isinstance(now.get("pid"), int) and now["pid"] != old_pid and int(now.get("restarts") or 0) > \
                restarts:
            pause = now.get("last_restart_pause_s")
            print(f"modelfs: restarted {mountpoint}: pid {old_pid} -> {now['pid']} (restart {now['restarts']}"
                  + (f", requests waited {pause:.3f}s" if isinstance(pause, (int, float)) else "") + ")")
            return 0
    return _fail(f"no new daemon took {mountpoint} over within {args.timeout:.0f}s; see its log")
