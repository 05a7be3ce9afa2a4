"""Bench infrastructure: timed commands, page-cache control and inspection, and the processes a bench run owns.

Everything started here is registered with a `Janitor` so that a bench run always unmounts (`fusermount3 -u -z`)
and stops every process it started, whatever happens. Nothing here knows about the cases (see run.py).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.ggufmaker import make_gguf_of_size as make_gguf_of_size  # noqa: E402  (re-exported for run.py)
from tests.support.models import list_models  # noqa: E402
from tests.support.router import RouterProcess as RouterProcess  # noqa: E402  (re-exported for run.py)
from tests.support.sshfs import Sshd, is_mounted  # noqa: E402
from tests.support.sshfs import SshfsMount as SshfsMount  # noqa: E402  (re-exported for run.py)
from tests.support.sshfs import sshfs_available as sshfs_available  # noqa: E402  (re-exported for run.py)

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


# Processes.


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
    """User + system CPU seconds of a process (all threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))


class Janitor:
    """Cleanup actions, run last-in first-out; each runs even if an earlier one fails."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> Callable[[], None]:
        self._actions.append((what, action))
        return action

    def run_now(self, action: Callable[[], None]) -> None:
        """Run one registered action early and forget it."""
        self._actions = [(w, a) for w, a in self._actions if a is not action]
        action()

    def close(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                print(f"bench: cleanup of {what} failed: {exc}", file=sys.stderr)


def fuse_unmount(path: Path) -> None:
    if is_mounted(str(path)):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


class Modelfs:
    """One `modelfs mount --foreground` daemon. With `levers`, it runs under bench/levers.py (experiments)."""

    def __init__(self, janitor: Janitor, mnt: Path, store: Path, args: Sequence[str], log: Path,
                 levers: Sequence[str] = (), trace: Path | None = None, profile: Path | None = None,
                 settings: dict[str, str] | None = None, code: Path | None = None) -> None:
        self.mnt = mnt
        self.store = store
        mnt.mkdir(parents=True, exist_ok=True)
        store.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS_", "LLM_"))}
        env.update(settings or {})  # MODELFS_* settings of this daemon
        if code is not None:  # run a snapshot of modelfs/, not the work tree (which may change during a run)
            env["PYTHONPATH"] = str(code)
        if levers or trace:
            cmd = [PYTHON, str(ROOT / "bench" / "levers.py")]
            env["BENCH_MODELFS_LEVERS"] = ",".join(levers)
            if trace:
                env["BENCH_MODELFS_TRACE"] = str(trace)
        else:
            cmd = [PYTHON, "-m", "modelfs"]
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([*cmd, "mount", str(mnt), "--store", str(store), "--foreground", *args],
                                         stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env,
                                         cwd=code or ROOT)
        self._cleanup = janitor.push(f"mount {mnt}", self._stop)
        self._janitor = janitor
        deadline = time.monotonic() + 20
        while not is_mounted(str(mnt)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"modelfs did not mount {mnt}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.01)
        os.stat(mnt)  # answered only once the daemon serves, i.e. after its own start-up (read-ahead) is done
        self.spy: subprocess.Popen[bytes] | None = None
        if profile is not None:
            # Native frames too: most of the daemon's time is in libfuse/pyfuse3 (Cython), invisible otherwise.
            self.spy = subprocess.Popen([py_spy(), "record", "--pid", str(self.pid), "--rate", "250", "--native",
                                         "--threads", "--format", "raw", "--output", str(profile)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches asynchronously

    @property
    def pid(self) -> int:
        return self.proc.pid

    def model(self, name: str) -> Path:
        return self.mnt / f"{name}.gguf"

    def bdi(self) -> Path:
        """The mount's backing-device-info directory, where read_ahead_kb lives."""
        dev = os.stat(self.mnt).st_dev
        return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")

    def read_ahead_kb(self) -> int:
        return int((self.bdi() / "read_ahead_kb").read_text())

    def set_read_ahead_kb(self, kb: int) -> None:
        """Set the mount's read-ahead, which bounds the size of the kernel's FUSE read requests (up to 1 MiB)."""
        (self.bdi() / "read_ahead_kb").write_text(f"{kb}\n")

    def peak_rss(self) -> int:
        return proc_status(self.pid, "VmHWM")

    def _stop(self) -> None:
        if self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
        fuse_unmount(self.mnt)
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def stop(self) -> None:
        self._janitor.run_now(self._cleanup)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
    return found


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


class Nginx:
    """nginx serving DIR in the llmlb API: `/v0/models/blob/<name>` → DIR/<name>/model.gguf, and `/v0/models`;
    each connection limited to `limit_rate` (nginx syntax, "25m") when given."""

    def __init__(self, janitor: Janitor, models_dir: Path, workdir: Path, limit_rate: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        models = [{"id": name, "size_bytes": size} for name, size in list_models(models_dir)]
        (workdir / "models.json").write_text(json.dumps({"data": models}))  # the list, as of start-up
        port = _free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/tmp; proxy_temp_path {workdir}/tmp; fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp; scgi_temp_path {workdir}/tmp;
    sendfile on; tcp_nopush on; keepalive_timeout 65;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        {f"limit_rate {limit_rate};" if limit_rate else ""}
        location ~ ^/v0/models/blob/(.+)$ {{ alias {models_dir}/$1/model.gguf; }}
        location = /v0/models {{ default_type application/json; alias {workdir}/models.json; }}
        location / {{ return 404; }}
    }}
}}
""")
        (workdir / "tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        janitor.push("nginx", self.stop)
        self.url = f"http://127.0.0.1:{port}"
        self.access_log = workdir / "access.log"
        self._log_start = 0
        _wait_port(port, self.proc)

    def reset(self) -> None:
        """Count bytes sent from now on."""
        self._log_start = self.access_log.stat().st_size if self.access_log.exists() else 0

    def bytes_sent(self, name: str) -> int:
        """Body bytes sent for blob `name` since reset(), from the access log (written when a request ends)."""
        with open(self.access_log, "rb") as log:
            log.seek(self._log_start)
            text = log.read().decode(errors="replace")
        wanted = "/v0/models/blob/" + name
        found = re.finditer(r'"GET (/v0/models/blob/\S+) [^"]*" \d+ (\d+)', text)
        return sum(int(m.group(2)) for m in found if urllib.parse.unquote(m.group(1)) == wanted)  # %2F or /

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not start") from None
            time.sleep(0.02)


def start_router(janitor: Janitor, models_dir: Path) -> RouterProcess:
    router = RouterProcess(models_dir, flavour="llmlb")
    janitor.push("router", router.stop)
    return router


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
