"""The service-manager protocol a serving daemon speaks with whatever holds its /dev/fuse descriptor: systemd (the
unit's file descriptor store) or modelfs's own supervisor, which implements the same protocol.

The daemon side: `notify` (sd_notify, with descriptors for `FDSTORE=1`) and `inherited` (the descriptors given
back at start, sd_listen_fds with names). The holder side: `Receiver`, a notification socket that accepts
messages only from the processes it supervises (checked by the kernel's SCM_CREDENTIALS, as systemd's
NotifyAccess=main does), and `Store`, the descriptors kept by name. See sd_notify(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Descriptors passed at start begin here (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("iII")
_MAX_FDS = 16


def notify(message: str, fds: list[int] | None = None) -> bool:
    """Send `message` to the service manager (NOTIFY_SOCKET), with `fds` attached; False when there is none.

    Failure to send is logged and reported, never raised: a daemon must not die because its manager went away.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([message.encode()], ancillary, 0, address)
    except OSError as exc:
        log.warning("cannot notify the service manager: %s", exc)
        return False
    return True


def inherited() -> dict[str, list[int]]:
    """Descriptors the service manager passed to this process, by name (LISTEN_FDS, LISTEN_FDNAMES).

    Only when LISTEN_PID is this process; the variables are removed so that children never see them. The
    descriptors are made close-on-exec.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if pid != os.getpid() or count <= 0:
        return {}
    found: dict[str, list[int]] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = names[index] if index < len(names) and names[index] else "unknown"
        found.setdefault(name, []).append(fd)
    return found


@dataclass
class Message:
    """One notification: who sent it, its KEY=VALUE fields, and the descriptors it carried."""

    pid: int
    fields: dict[str, str]
    fds: list[int] = field(default_factory=list)


class Receiver:
    """A notification socket in a private directory (mode 0700), for one supervised process at a time."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        st = os.stat(directory)
        if st.st_uid != os.geteuid():
            raise PermissionError(f"{directory} belongs to uid {st.st_uid}, not to us")
        self.path = directory / name
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, senders: set[int]) -> Message | None:
        """The next message from one of the processes `senders`, or None if there is none now. Messages from
        anyone else are dropped (their descriptors closed) with a warning: only our own daemons may hand us
        descriptors."""
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(_MAX_FDS * 4) + socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return None
            fds: list[int] = []
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack_from(payload)[0]
            for fd in fds:
                os.set_inheritable(fd, False)
            if pid not in senders or pid <= 0:
                log.warning("ignoring a notification from pid %d (not the daemon this supervisor runs)", pid)
                for fd in fds:
                    os.close(fd)
                continue
            fields = dict(line.partition("=")[::2] for line in data.decode(errors="replace").splitlines() if line)
            return Message(pid, fields, fds)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Store:
    """The holder's side of FDSTORE=1: descriptors kept by name (FDSTOREREMOVE=1 drops a name), as systemd does."""

    def __init__(self) -> None:
        self.fds: dict[str, list[int]] = {}

    def apply(self, message: Message) -> None:
        """Keep or drop what a message says; descriptors it carries for anything else are closed."""
        fields = message.fields
        if fields.get("FDSTOREREMOVE") == "1" and "FDNAME" in fields:
            for fd in self.fds.pop(fields["FDNAME"], []):
                os.close(fd)
        if fields.get("FDSTORE") == "1" and message.fds:
            self.fds.setdefault(fields.get("FDNAME", "stored"), []).extend(message.fds)
        else:
            for fd in message.fds:
                os.close(fd)

    def first(self, name: str) -> int | None:
        held = self.fds.get(name)
        return held[0] if held else None

    def held(self) -> list[tuple[str, int]]:
        """Every descriptor with its name, in the order LISTEN_FDS passes them."""
        return [(name, fd) for name, fds in self.fds.items() for fd in fds]

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        self.fds.clear()
