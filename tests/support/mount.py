"""One modelfs daemon, for tests and the bench alike: `modelfs mount --foreground` as a real process (so a test can
kill -9 it), started until the kernel shows the mount, always stopped with a lazy unmount whatever state it is in,
and its log checked for errors nobody declared expected.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.procs import proc_status
from tests.support.sshfs import is_mounted

MODELFS = [sys.executable, "-m", "modelfs"]
START_TIMEOUT = 20.0
# When the mount goes away (or a reader is killed) the kernel drops requests still in flight, such as read-ahead
# waiting on a download or a queued FUSE_RELEASE; libfuse then cannot reply to them.
BENIGN_ERRORS = ("fuse_reply_* failed with No such file or directory",)


def fuse_missing() -> str | None:
    """Why this process cannot mount modelfs (for pytest.skip), or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if os.geteuid() != 0:
        return "FUSE integration tests run as root"
    return None


def daemon_env(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its MODELFS_* and LLM_* variables, plus `settings`: a daemon is
    configured by its arguments and the settings its caller chose, never by the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS_", "LLM_"))}
    env.update(settings or {})
    return env


def unmount(path: Path) -> None:
    """Lazy unmount (`fusermount3 -u -z`) if `path` is a mountpoint; never touches the mount itself."""
    if is_mounted(str(path)):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


def stop_daemon(proc: subprocess.Popen[bytes], path: Path) -> None:
    """Unmount `path` and wait for the daemon `proc` to exit (killed after 15 s), at any moment of its life: a
    daemon still starting is asked to stop with SIGTERM, and a mount left by a killed daemon is removed."""
    mounted = is_mounted(str(path))
    unmount(path)
    if proc.poll() is None:
        if not mounted:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    unmount(path)


class Mount:
    """One modelfs daemon and its mountpoint: `Mount(...).start()`, or `with Mount(...) as m:`.

    `env` holds MODELFS_* settings on top of `daemon_env()`. With `code`, the daemon runs the modelfs package
    found there (a copy the bench freezes at its start) instead of the installed one.
    """

    def __init__(self, path: Path, store: Path, args: Sequence[str], log: Path,
                 env: Mapping[str, str] | None = None, code: Path | None = None) -> None:
        self.path = path
        self.store = store
        self.args = list(args)
        self.log = log
        self.env = daemon_env(env)
        if code is not None:
            self.env["PYTHONPATH"] = str(code)
        self.cwd = code
        self.expected_errors: list[str] = list(BENIGN_ERRORS)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mount:
        """Start the daemon and wait until the kernel shows the mount; RuntimeError with its log if it does not."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*MODELFS, "mount", str(self.path), "--store", str(self.store), "--foreground", *self.args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not is_mounted(str(self.path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelfs exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"modelfs did not mount within {START_TIMEOUT:.0f}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)
        return self

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def mnt(self) -> Path:
        """Transitional: the bench's name for `path`, for bench cases written before tests.support."""
        return self.path

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def model(self, name: str) -> Path:
        return self.path / f"{name}.gguf"

    def peak_rss(self) -> int:
        """The daemon's peak resident memory so far (VmHWM), in bytes."""
        return proc_status(self.pid, "VmHWM")

    def bdi(self) -> Path:
        """The mount's backing-device-info directory in sysfs, where its read_ahead_kb lives."""
        dev = os.stat(self.path).st_dev
        return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")

    def read_ahead_kb(self) -> int:
        return int((self.bdi() / "read_ahead_kb").read_text())

    def kill9(self) -> None:
        """Crash the daemon; the mountpoint stays behind in ENOTCONN state until the lazy unmount here."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=10)

    def stop(self) -> None:
        """`stop_daemon`; safe to call again."""
        if self.proc is not None:
            stop_daemon(self.proc, self.path)
        self.proc = None

    def unexpected_errors(self) -> list[str]:
        """Tracebacks and ERROR or CRITICAL lines of the daemon's log that no `expected_errors` entry explains."""
        bad = []
        for line in self.log_text().splitlines():
            if ("Traceback" in line or " ERROR " in line or " CRITICAL " in line) and not any(
                expected in line for expected in self.expected_errors
            ):
                bad.append(line)
        return bad
