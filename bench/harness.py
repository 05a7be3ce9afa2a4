"""Bench infrastructure: timed commands, statistics, page-cache control and inspection, daemon profiles, and the
cleanup of everything a bench run starts.

The components themselves (the modelfs mount, test router, sshfs, nginx, GGUF files, process sampling) come from
tests.support; here they are only registered with a `Janitor`, so that a bench run always unmounts and stops
every process it started, whatever happens. Nothing here knows about the cases (see core.py and *_cases.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.support.ggufmaker import make_gguf_of_size as make_gguf_of_size  # (re-exported for the cases)
from tests.support.mount import Mount
from tests.support.nginx import Nginx as NginxServer
from tests.support.nginx import start_nginx as start_nginx_retrying
from tests.support.procs import RssSampler as RssSampler  # (re-exported for the cases)
from tests.support.procs import cpu_seconds as cpu_seconds  # (re-exported for the cases)
from tests.support.router import RouterProcess as RouterProcess  # (re-exported for the cases)
from tests.support.sshfs import Sshd
from tests.support.sshfs import SshfsMount as SshfsMount  # (re-exported for the cases)
from tests.support.sshfs import sshfs_available as sshfs_available  # (re-exported for the cases)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PAGE = mmap.PAGESIZE
MIB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


# Timing and statistics.


def timed(cmd: Sequence[str], **kwargs: Any) -> float:
    """Wall seconds of one command (stdout to /dev/null unless given); raises if it fails."""
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    start = time.perf_counter()
    subprocess.run(list(cmd), check=True, **kwargs)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """`median [min..max]` of some samples, for raw output."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


# Page cache.


def drop_caches() -> None:
    """Write back and drop the whole page cache (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def evict(path: Path) -> None:
    """Drop the cached pages of one file (POSIX_FADV_DONTNEED drops clean pages only: sync dirty files first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Bring a file into the page cache by reading it once."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def cached_bytes_fd(fd: int) -> int:
    """Bytes of the file behind `fd` in the page cache (mincore of a mapping, which never faults pages in)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident = sum(b & 1 for b in vec.raw)
    finally:
        _libc.munmap(addr, size)
    return min(resident * PAGE, size)


def cached_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return cached_bytes_fd(fd)
    finally:
        os.close(fd)


class Janitor:
    """Cleanup actions, run last-in first-out; each runs even if an earlier one fails."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> Callable[[], None]:
        self._actions.append((what, action))
        return action

    def close(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                print(f"bench: cleanup of {what} failed: {exc}", file=sys.stderr)


def start_mount(janitor: Janitor, mnt: Path, store: Path, args: Sequence[str], log: Path,
                settings: dict[str, str] | None = None, code: Path | None = None) -> Mount:
    """A started modelfs mount (tests.support.mount), stopped by the janitor unless stopped earlier. Without a
    supervisor: the process started is the serving daemon, whose CPU, RSS and profile the bench measures."""
    m = Mount(mnt, store, ["--no-supervisor", *args], log, settings, code=code)
    janitor.push(f"mount {mnt}", m.stop)
    return m.start()


class Profile:
    """py-spy recording a daemon (native frames too: most of its time is in libfuse and pyfuse3, Cython code that
    is invisible otherwise) into `out` until `stop()`, which the janitor calls at the latest."""

    def __init__(self, janitor: Janitor, pid: int, out: Path) -> None:
        found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(found, os.X_OK):
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        self.proc = subprocess.Popen([found, "record", "--pid", str(pid), "--rate", "250", "--native", "--threads",
                                      "--format", "raw", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        janitor.push(f"py-spy of {pid}", self.stop)
        time.sleep(1.0)  # py-spy attaches asynchronously

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """The frames with the most samples of a py-spy raw (collapsed stacks) file: self time, then inclusive."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    # Threads parked in epoll_wait or a futex (an unnamed libc address) are waiting, not working.
    idle = sum(n for f, n in own.items() if f.startswith(("epoll_wait", "0x")) and "libc" in f)
    if not total:
        return ["(no samples)"]
    busy = [(f, n) for f, n in own.items() if not (f.startswith(("epoll_wait", "0x")) and "libc" in f)]
    lines = [f"{total} samples, {100 * idle / total:.0f}% of them waiting (epoll_wait, futex); busy frames, self:"]
    lines += [f"  {100 * n / total:5.1f}% {f}" for f, n in sorted(busy, key=lambda x: -x[1])[:top]]
    lines.append("inclusive (modelfs, pyfuse3, libfuse, trio, httpx frames):")
    keep = ("modelfs/", "pyfuse3", "libfuse", "fuse_reply", "writev", "pread", "trio/_core/_run", "httpcore",
            "httpx", "recv", "pwritev", "to_thread", "handlers.pxi")
    chosen = [(f, n) for f, n in inclusive.items() if any(k in f for k in keep) and n < total]
    lines += [f"  {100 * n / total:5.1f}% {f}" for f, n in sorted(chosen, key=lambda x: -x[1])[:top]]
    return lines


def start_router(janitor: Janitor, models_dir: Path) -> RouterProcess:
    """The test router (llmlb flavour: it ignores Range) serving `models_dir`."""
    router = RouterProcess(models_dir, flavour="llmlb")
    janitor.push("router", router.stop)
    return router


def start_nginx(janitor: Janitor, models_dir: Path, workdir: Path, limit_rate: str | None = None) -> NginxServer:
    """nginx serving `models_dir` in the llmlb API (Range natively, the model list as of now), each connection
    limited to `limit_rate` (nginx syntax, "25m") when given."""
    server = start_nginx_retrying(lambda: NginxServer.models(workdir, models_dir, limit_rate, model_list=True))
    janitor.push("nginx", server.stop)
    return server


Nginx = start_nginx  # transitional: the name (and arguments) bench cases used before tests.support


def start_sshfs(janitor: Janitor, remote_dir: Path, mountpoint: Path, direct_io: bool = True) -> SshfsMount:
    """A real sshfs of `remote_dir` over a private loopback sshd (uncached, direct_io as in the tests unless
    `direct_io=False`: then sshfs's default I/O, through the page cache, where a shared mmap works)."""
    sshd = Sshd().__enter__()
    janitor.push("sshd", sshd.close)
    mount = SshfsMount(sshd, str(remote_dir), str(mountpoint), direct_io=direct_io).__enter__()
    janitor.push("sshfs", mount.close)
    return mount


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prefault(nbytes: int) -> None:
    """Touch and free `nbytes` of anonymous memory right before a timed run.

    On a VM with free page reporting (virtio-balloon), memory freed a few seconds ago has been handed back to the
    host, and the first touch of such a page costs ~2 s/GiB: whichever run allocates page cache first would pay
    it. Touching memory just before the run leaves host-backed pages at the head of the free lists.
    """
    zeros = bytes(MIB)
    with mmap.mmap(-1, max(nbytes, MIB)) as area:
        for _ in range(max(nbytes, MIB) // MIB):
            area.write(zeros)
