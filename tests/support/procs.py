"""The processes tests and the bench start (router, sshd, sshfs, nginx, modelfs): stopping them politely then for
sure, the loopback ports they listen on, waiting for what they do, and what they cost (RSS and CPU from /proc).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds; a no-op if it already exited."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def free_port() -> int:
    """A loopback port nobody listens on right now (a small race, which the callers that care retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(check: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll `check()` every `interval` seconds until it is true (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()` is true; raise AssertionError naming `what` after `timeout` seconds."""
    if not eventually(predicate, timeout):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    """Wait until `proc` accepts connections on 127.0.0.1:`port`; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f}s") from None
            time.sleep(0.02)


def proc_status(pid: int, key: str) -> int:
    """A `kB` field of /proc/PID/status in bytes (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Periodic:
    """Calls `sample()` in a thread at once and then every `interval` seconds while in use as a context manager,
    and once more at its exit."""

    def __init__(self, sample: Callable[[], None], interval: float) -> None:
        self._sample = sample
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread while in use as a context manager: `peak`
    is the largest seen, `samples` every (seconds since start, bytes) pair."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._periodic = Periodic(self._sample, interval)
        self._began = time.monotonic()

    def _sample(self) -> None:
        rss = proc_status(self.pid, "VmRSS")
        self.samples.append((time.monotonic() - self._began, rss))
        self.peak = max(self.peak, rss)

    def __enter__(self) -> RssSampler:
        self._began = time.monotonic()
        self._periodic.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._periodic.__exit__(*exc)
