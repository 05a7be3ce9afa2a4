"""A real network filesystem for tests: sshfs over a private loopback sshd.

Owns `Sshd` (throwaway sshd on 127.0.0.1) and `SshfsMount` (uncached, no-reconnect sshfs
mount that tests can SIGSTOP / SIGKILL to play a hung or dead NFS server).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Self

from tests.support.procs import free_port, stop_process, wait_port

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 10.0

# Options that turn off every cache we can, so a change in remote_dir shows on the next
# open/stat: sshfs's own directory/attribute cache (dir_cache=no) and the kernel's dentry,
# attribute and negative-lookup caches (*_timeout=0). SshfsMount adds direct_io (no page
# cache at all) unless told not to: with it, a shared mmap of a file fails with ENODEV.
# Without kernel_cache/auto_cache, each open drops cached pages anyway.
# Deliberately absent: `reconnect` (a killed sshfs must leave ENOTCONN, like a dead NFS)
# and `auto_unmount` (it would unmount on death and hide that state).
NO_CACHE_OPTIONS: tuple[str, ...] = (
    "dir_cache=no",
    "attr_timeout=0",
    "entry_timeout=0",
    "negative_timeout=0",
)


def sshfs_available() -> str | None:
    """Why this machine can't run sshfs tests (for pytest.skip), or None if it can."""
    if os.geteuid() != 0:
        return "sshfs tests need root (sshd login as root, direct FUSE mount)"
    for tool in ("sshfs", "ssh", "ssh-keygen", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install -y openssh-server sshfs fuse3)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} missing (apt-get install -y openssh-server)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing (no FUSE in this kernel/container)"
    return None


def is_mounted(path: str) -> bool:
    """Whether `path` is a mountpoint, read from /proc/mounts so it never touches the mount
    (os.path.ismount would hang on a stopped sshfs)."""
    # Resolve only the parent: stat-ing the mountpoint itself would go through FUSE.
    parent, name = os.path.split(os.path.abspath(path))
    target = os.path.join(os.path.realpath(parent), name)
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and _unescape_mount_path(fields[1]) == target:
                return True
    return False


def _unescape_mount_path(field: str) -> str:
    """Undo the octal escapes (\\040 for space, ...) /proc/mounts uses in paths."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _read_log(f: IO[bytes]) -> str:
    """Everything a subprocess wrote to its (temp file) stderr, for error messages."""
    f.flush()
    f.seek(0)
    return f.read().decode("utf-8", "replace").strip()


class _Started:
    """`with X(...) as x:` starts x and always ends with `x.close()`, also when the start itself fails."""

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sshd(_Started):
    """A private sshd on 127.0.0.1:<free port> with its own keys, config and pid file,
    so it never touches the system sshd. Root may log in with `client_key` only."""

    def __init__(self) -> None:
        self.dir: str = ""
        self.port: int = 0
        self.client_key: str = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="modelfs-sshd-")
        host_key = os.path.join(self.dir, "host_key")
        self.client_key = os.path.join(self.dir, "client_key")
        for key in (host_key, self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", key],
                check=True, timeout=30, stdin=subprocess.DEVNULL,
            )
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copyfile(self.client_key + ".pub", authorized)
        self.port = free_port()
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w", encoding="utf-8") as f:
            f.write(
                f"ListenAddress 127.0.0.1\n"
                f"Port {self.port}\n"
                f"HostKey {host_key}\n"
                f"AuthorizedKeysFile {authorized}\n"
                f"PidFile {os.path.join(self.dir, 'sshd.pid')}\n"
                "PermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "Subsystem sftp internal-sftp\n"
            )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege-separation dir
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", config],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )
        try:
            wait_port(self.port, self.proc, "sshd", START_TIMEOUT)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {_read_log(self._log)}") from None

    def log(self) -> str:
        """sshd's stderr so far (useful when a mount fails to authenticate)."""
        return _read_log(self._log) if self._log else ""

    def close(self) -> None:
        """Stop sshd and delete its keys; safe to call twice."""
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


class SshfsMount(_Started):
    """`sshd`'s `remote_dir` mounted at `mountpoint` by a foreground sshfs (so `pid` is the
    sshfs process itself), with caching off and no reconnect."""

    def __init__(
        self,
        sshd: Sshd,
        remote_dir: str,
        mountpoint: str,
        extra_options: Sequence[str] = (),
        direct_io: bool = True,
    ) -> None:
        self.sshd = sshd
        self.remote_dir = os.path.abspath(remote_dir)
        self.mountpoint = os.path.abspath(mountpoint)
        self.extra_options = tuple(extra_options)
        self.direct_io = direct_io
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The sshfs process id (the one .stop()/.kill() signal)."""
        assert self.proc is not None, "not mounted"
        return self.proc.pid

    def _start(self) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        options = [
            f"IdentityFile={self.sshd.client_key}",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "LogLevel=ERROR",  # no "Permanently added ... to known hosts" noise
            *NO_CACHE_OPTIONS,
            *(["direct_io"] if self.direct_io else []),
            *self.extra_options,
        ]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [
                "sshfs", "-f",
                f"root@127.0.0.1:{self.remote_dir}", self.mountpoint,
                "-p", str(self.sshd.port),
                "-F", "/dev/null",  # ignore ~/.ssh/config and /etc/ssh/ssh_config
                "-o", ",".join(options),
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshfs exited with {self.proc.returncode}: {_read_log(self._log)}\n"
                    f"sshd log:\n{self.sshd.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.mountpoint} not mounted after {START_TIMEOUT:.0f}s: "
                    f"{_read_log(self._log)}\nsshd log:\n{self.sshd.log()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGSTOP sshfs: from now on every access to the mount blocks, like a hung NFS
        server. Returns once the process is really stopped."""
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True
        deadline = time.monotonic() + 5
        while _proc_state(self.pid) not in ("T", "t", None):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshfs {self.pid} did not stop")
            time.sleep(0.01)

    def cont(self) -> None:
        """SIGCONT sshfs: blocked accesses complete and the mount works again."""
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGKILL sshfs: the mount stays but every access fails with ENOTCONN, like a
        disconnected NFS."""
        assert self.proc is not None, "not mounted"
        self.proc.kill()  # works on a stopped process too
        self.proc.wait(timeout=5)
        self.stopped = False

    def close(self) -> None:
        """Unmount and end sshfs whatever state it is in; never blocks on the mount."""
        if self.proc is not None and self.proc.poll() is None and self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)  # else unmount/exit would hang
        self.stopped = False
        if is_mounted(self.mountpoint):
            r = subprocess.run(
                ["fusermount3", "-u", "-z", self.mountpoint],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
            )
            if r.returncode != 0:  # e.g. not in fusermount's view of mounts
                subprocess.run(
                    ["umount", "-l", self.mountpoint],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                )
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, T, ...), None if the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
