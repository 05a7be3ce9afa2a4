"""Shared directories on a real network filesystem: an sshfs mount over a loopback sshd, healthy, hung (SIGSTOP of
sshfs, like a dead NFS server) and dead (SIGKILL, ENOTCONN like a disconnected NFS).

Every access to a mount that might hang runs in a child process with a timeout, so a hang fails a test instead of
freezing the run. The sshfs fixture depends on `mount`, so it is torn down first: SshfsMount resumes a stopped
sshfs before unmounting it, and the modelfs daemon then exits without threads stuck on a stopped server.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import eventually, wait_for
from tests.support.sshfs import Sshd, SshfsMount, sshfs_available

_REASON = sshfs_available()
#: Every read here runs with FUSE passthrough and with the daemon read path.
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.io_paths]

#: --shared-timeout of every mount here: how long a lookup or read may wait on a hung shared directory.
SHARED_TIMEOUT = 1.0
#: How soon after sshfs hangs other models must still be served (the issue's requirement).
SERVED_WITHIN = 2.0
#: A child blocked longer than this is killed and the test fails (a FUSE wait is killable).
CHILD_TIMEOUT = 10.0

# Runs in a child: each argument is "op:path"; prints one JSON list with a result per argument.
_ACCESS = r"""
import hashlib, json, os, sys, time
def one(op, path):
    start = time.monotonic()
    try:
        if op == "read":
            with open(path, "rb") as f:
                value = hashlib.sha256(f.read()).hexdigest()
        elif op == "list":
            value = sorted(os.listdir(path))
        elif op == "stat":
            value = os.stat(path).st_size
        elif op == "source":
            value = os.getxattr(path, "user.modelfs.source").decode()
        elif op == "path":
            value = os.getxattr(path, "user.modelfs.path").decode()
        result = {"value": value}
    except OSError as exc:
        result = {"errno": exc.errno}
    result["seconds"] = time.monotonic() - start
    return result
print(json.dumps([one(*arg.split(":", 1)) for arg in sys.argv[1:]]))
"""

# Runs in a child: opens argv[1], reads its first page, says "open", then obeys "read OFFSET" / "close" lines,
# answering "ok <bytes>" or "errno <n>", then the seconds the call took.
_HOLD = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.pread(fd, 4096, 0)
print("open", flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    start = time.monotonic()
    try:
        if command == "read":
            answer = f"ok {len(os.pread(fd, 65536, int(arg)))}"
        else:
            os.close(fd)
            answer = "ok 0"
    except OSError as exc:
        answer = f"errno {exc.errno}"
    print(f"{answer} {time.monotonic() - start:.3f}", flush=True)
"""


def access(*ops: tuple[str, Path], timeout: float = CHILD_TIMEOUT) -> list[dict]:
    """Run each (op, path) in one child process, in order; a child still blocked after `timeout` fails the test."""
    try:
        proc = subprocess.run([sys.executable, "-c", _ACCESS, *(f"{op}:{path}" for op, path in ops)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # run() has killed and reaped it
        pytest.fail(f"{[op for op, _ in ops]} still blocked after {timeout}s: the mount hangs")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Holder:
    """A child that keeps one file of the mount open, so a test can hang its server and then read or close it."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        assert self._next(CHILD_TIMEOUT) == "open"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("")  # EOF: the child died

    def _next(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the child holding the file is still blocked after {timeout}s")
        assert line, f"the child holding the file died: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return line

    def ask(self, command: str, timeout: float = CHILD_TIMEOUT) -> tuple[str, float]:
        """("ok <n>" or "errno <n>", seconds) for one "read OFFSET" or "close"."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer, _, seconds = self._next(timeout).rpartition(" ")
        return answer, float(seconds)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._pump_thread.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@dataclass
class Remote:
    """The server side (`dir`, written directly) and the sshfs client that modelfs reads as a shared dir."""

    dir: Path
    sshfs: SshfsMount


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    with Sshd() as server:
        yield server


@pytest.fixture
def remote(sshd: Sshd, dirs: dict[str, Path], mount: object, tmp_path: Path) -> Iterator[Remote]:
    """dirs["shared"] becomes an sshfs mount of a fresh remote dir. Depends on `mount` so it is torn down (sshfs
    resumed and unmounted) before the modelfs mounts are."""
    server_dir = tmp_path / "remote"
    server_dir.mkdir()
    with SshfsMount(sshd, str(server_dir), str(dirs["shared"])) as sshfs:
        yield Remote(server_dir, sshfs)


@pytest.fixture
def holders() -> Iterator[Callable[[Path], Holder]]:
    started: list[Holder] = []

    def hold(path: Path) -> Holder:
        started.append(Holder(path))
        return started[-1]

    yield hold
    for holder in started:
        holder.kill()


def mount_args(dirs: dict[str, Path], *extra: str) -> list[str]:
    return ["--shared", str(dirs["shared"]), "--shared", str(dirs["shared2"]),
            "--shared-timeout", f"{SHARED_TIMEOUT:g}", *extra]


def unavailable_warnings(log: str, root: Path) -> list[str]:
    return [line for line in log.splitlines()
            if " WARNING " in line and f"shared directory {root} unavailable" in line]


def test_model_on_sshfs_reads_byte_identically_in_place(mount, dirs, remote):
    data = gguf_bytes(3_000_001)
    write_model(remote.dir, "qwen", data)
    write_model(remote.dir, "org/flat", b"GGUF-flat", flat=True)
    local = write_model(dirs["store"], "llama", b"GGUF-local")
    m = mount(*mount_args(dirs))
    read, source, path, flat, listing = access(
        ("read", m.model("qwen")), ("source", m.model("qwen")), ("path", m.model("qwen")),
        ("read", m.model("org/flat")), ("list", m.path))
    assert read["value"] == digest(data)
    assert source["value"] == "shared"
    assert path["value"] == str(dirs["shared"] / "qwen" / "model.gguf")  # the sshfs path, read in place
    assert flat["value"] == digest(b"GGUF-flat")
    assert listing["value"] == ["llama.gguf", "org", "qwen.gguf"]
    # Nothing was copied into the store.
    assert [p for p in dirs["store"].rglob("*") if p.is_file()] == [local]


def test_remote_rewrite_and_rename_replace_are_seen_on_next_open(mount, dirs, remote):
    path = write_model(remote.dir, "live", b"GGUF-version-1")
    old = time.time_ns() - 10 * 10**9
    os.utime(path, ns=(old, old))  # an older file, replaced by a newer one below
    m = mount(*mount_args(dirs))
    inodes = []
    assert access(("read", m.model("live")))[0]["value"] == digest(b"GGUF-version-1")
    inodes.append(os.stat(m.model("live")).st_ino)
    # Same size, new content, a new file renamed over the old one on the server.
    tmp = path.with_name("tmp")
    tmp.write_bytes(b"GGUF-version-2")
    os.replace(tmp, path)
    assert access(("read", m.model("live")))[0]["value"] == digest(b"GGUF-version-2"), m.log_text()
    inodes.append(os.stat(m.model("live")).st_ino)
    # Rewritten in place with another size: seen once the kernel's 1 s attribute cache of the mount expires.
    path.write_bytes(b"GGUF-version-three")
    time.sleep(1.2)
    assert access(("read", m.model("live")))[0]["value"] == digest(b"GGUF-version-three")
    inodes.append(os.stat(m.model("live")).st_ino)
    # A file of another size is another inode (the kernel's size for the old one must not serve it). A same-size
    # file opened through the dentry the kernel still had may take over the old inode, with no handle open on
    # it and its cached pages dropped.
    assert inodes[2] not in inodes[:2], m.log_text()
    assert m.log_text().count("page cache renewed") >= 1


def test_same_size_replacement_within_the_same_second_is_seen(mount, dirs, remote):
    """sshfs has path-based inode numbers and whole-second mtimes: a same-size replacement within the same second
    keeps (dev, ino, size, mtime), so only distrusting a recently modified file's identity keeps this fresh."""
    m = mount(*mount_args(dirs))
    # The first look must come within the 2 s "recently changed" window of the file's mtime, so it is written
    # only now that the mount is up (a forged mtime in the past would defeat the window, not test it).
    second = time.time_ns() // 10**9 * 10**9
    path = write_model(remote.dir, "live", b"GGUF-version-1")
    os.utime(path, ns=(second, second + 100_000_000))
    assert access(("read", m.model("live")))[0]["value"] == digest(b"GGUF-version-1")
    tmp = path.with_name("tmp")
    tmp.write_bytes(b"GGUF-version-2")
    os.utime(tmp, ns=(second, second + 600_000_000))  # 0.5 s later, as a quick re-publish would be
    os.replace(tmp, path)
    assert access(("read", m.model("live")))[0]["value"] == digest(b"GGUF-version-2"), m.log_text()


def test_hung_sshfs_is_skipped_and_comes_back(mount, dirs, remote):
    write_model(dirs["store"], "llama", b"GGUF-local")
    write_model(dirs["shared2"], "gemma", b"GGUF-shared2")
    qwen = gguf_bytes(1_000_003)
    write_model(remote.dir, "qwen", qwen)
    m = mount(*mount_args(dirs))
    assert access(("list", m.path))[0]["value"] == ["gemma.gguf", "llama.gguf", "qwen.gguf"]

    remote.sshfs.stop()
    stopped = time.monotonic()
    # The local model never touches a shared dir. The model in the healthy second shared dir is looked up after
    # the hung one, which costs at most --shared-timeout once (or nothing if the prober got there first).
    for name in ("llama", "gemma"):
        result = access(("read", m.model(name)))[0]
        after_stop = time.monotonic() - stopped
        assert "value" in result, f"{name}: errno {result.get('errno')}"
        assert after_stop < SERVED_WITHIN, f"{name} served {after_stop:.2f}s after sshfs hung"
    listing, miss = access(("list", m.path), ("stat", m.path / "nowhere.gguf"))
    assert listing["value"] == ["gemma.gguf", "llama.gguf"]
    assert miss["errno"] == 2
    assert eventually(lambda: access(("stat", m.model("qwen")))[0].get("errno") == 2, 5), "hung dir not skipped"
    warnings = unavailable_warnings(m.log_text(), dirs["shared"])
    assert len(warnings) == 1, m.log_text()

    remote.sshfs.cont()
    # Back once the prober (every 1 s) gets an answer and the short negative caches (1-2 s) expire.
    assert eventually(lambda: access(("read", m.model("qwen")))[0].get("value") == digest(qwen), 8), m.log_text()
    assert access(("list", m.path))[0]["value"] == ["gemma.gguf", "llama.gguf", "qwen.gguf"]
    assert f"shared directory {dirs['shared']} is back" in m.log_text()
    assert len(unavailable_warnings(m.log_text(), dirs["shared"])) == 1


def test_dead_sshfs_enotconn_is_skipped_cleanly(mount, dirs, remote):
    write_model(dirs["store"], "llama", b"GGUF-local")
    write_model(remote.dir, "qwen", b"GGUF-remote")
    write_model(remote.dir, "org/model", b"GGUF-org")
    m = mount(*mount_args(dirs))
    remote.sshfs.kill()
    assert access(("stat", dirs["shared"]))[0]["errno"] == 107  # ENOTCONN: a disconnected network filesystem
    read, listing, miss, gone, gone_dir = access(
        ("read", m.model("llama")), ("list", m.path), ("stat", m.model("nowhere")), ("stat", m.model("qwen")),
        ("stat", m.path / "org"))
    assert read["value"] == digest(b"GGUF-local")
    assert listing["value"] == ["llama.gguf"]
    assert miss["errno"] == gone["errno"] == gone_dir["errno"] == 2
    warnings = unavailable_warnings(m.log_text(), dirs["shared"])
    # ENOTCONN for new requests; a request in flight at the kill gets ECONNABORTED from the kernel instead.
    reasons = ("Transport endpoint is not connected", "Software caused connection abort")
    assert len(warnings) == 1 and any(reason in warnings[0] for reason in reasons), m.log_text()
    assert "Traceback" not in m.log_text()  # and the mount fixture fails on any ERROR line


def test_close_of_a_file_on_a_hung_dir_does_not_block_the_daemon(mount, dirs, remote, holders):
    write_model(dirs["store"], "llama", b"GGUF-local")
    write_model(dirs["shared2"], "gemma", b"GGUF-shared2")
    write_model(remote.dir, "qwen", gguf_bytes(1_000_003))
    m = mount(*mount_args(dirs, "--debug"))
    holder = holders(m.model("qwen"))
    remote.sshfs.stop()
    answer, _ = holder.ask("close")  # the release reaches the daemon, whose close of the sshfs file hangs
    assert answer == "ok 0"
    closed = time.monotonic()
    for name in ("llama", "gemma"):
        result = access(("read", m.model(name)))[0]
        assert "value" in result and time.monotonic() - closed < SERVED_WITHIN, (name, result)
    hung_close = f"on {dirs['shared']} did not return within {SHARED_TIMEOUT:g}s"
    assert eventually(lambda: hung_close in m.log_text(), 5), m.log_text()
    assert access(("read", m.model("llama")))[0]["value"] == digest(b"GGUF-local")  # still serving


def test_read_of_an_open_file_on_a_hung_dir_is_eio_not_a_hang(mount, dirs, remote, holders):
    data = gguf_bytes(8 << 20)
    write_model(remote.dir, "qwen", data)
    m = mount(*mount_args(dirs))
    holder = holders(m.model("qwen"))
    remote.sshfs.stop()
    offset = 7 << 20  # far past what the first read and the kernel's readahead brought into the page cache
    answer, seconds = holder.ask(f"read {offset}", timeout=SHARED_TIMEOUT + 5)
    assert answer == "errno 5", f"{answer} after {seconds:.2f}s"  # EIO
    remote.sshfs.cont()
    # The same open file reads again once the prober has seen the directory answer.
    assert eventually(lambda: holder.ask(f"read {offset}")[0] == "ok 65536", 5), m.log_text()
    assert access(("read", m.model("qwen")))[0]["value"] == digest(data)


def test_io_path_per_backing_filesystem(mount, dirs, sshd, tmp_path, io, holders):
    """sshfs with direct_io cannot map files shared, so passthrough would break mmap there: its files take the
    daemon path. sshfs with its default options maps them, so they are passed through (when the test's I/O path
    is passthrough)."""
    direct, cached = tmp_path / "direct", tmp_path / "cached"
    for server in (direct, cached):
        server.mkdir()
    write_model(direct, "a", gguf_bytes(2_000_003, seed=1))
    write_model(cached, "b", gguf_bytes(2_000_003, seed=2))
    with SshfsMount(sshd, str(direct), str(dirs["shared"])), \
            SshfsMount(sshd, str(cached), str(dirs["shared2"]), direct_io=False):
        m = mount(*mount_args(dirs))
        # With passthrough active, `user.modelfs.io` says why a file falls back to the daemon path.
        direct_io = "daemon (filesystem cannot map files shared)" if io == "passthrough" else "daemon"
        for name, seed, expected in (("a", 1, direct_io), ("b", 2, "passthrough" if io == "passthrough" else "daemon")):
            held = holders(m.model(name))
            assert os.getxattr(m.model(name), "user.modelfs.io").decode() == expected, m.log_text()
            with open(m.model(name), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                assert mm[:] == gguf_bytes(2_000_003, seed=seed)
            held.kill()
        if io == "passthrough":
            assert "cannot map files shared" in m.log_text()


def test_passthrough_reader_of_a_hung_server_waits_there_while_the_daemon_serves_others(
        mount, dirs, sshd, tmp_path, io, holders):
    """With passthrough the kernel reads the backing file itself: a reader of a hung server waits in that
    filesystem's client, as a direct reader would, and the daemon is not involved, so every other model is
    served as before. On the daemon path the same read is EIO after the shared timeout (test above)."""
    if io != "passthrough":
        pytest.skip("the daemon path's behaviour is tested above")
    server = tmp_path / "server"
    server.mkdir()
    data = gguf_bytes(8 << 20)
    write_model(server, "qwen", data)
    write_model(dirs["store"], "llama", b"GGUF-local")
    with SshfsMount(sshd, str(server), str(dirs["shared"]), direct_io=False) as sshfs:
        m = mount(*mount_args(dirs))
        holder = holders(m.model("qwen"))
        assert os.getxattr(m.model("qwen"), "user.modelfs.io") == b"passthrough"
        sshfs.stop()
        def read_far() -> None:
            try:
                holder.ask(f"read {7 << 20}", timeout=30)
            except BaseException:  # noqa: BLE001 - the child is killed below, mid-read: that ends this wait
                pass

        reading = threading.Thread(target=read_far, daemon=True)
        reading.start()
        time.sleep(0.5)
        assert reading.is_alive()  # waiting in sshfs, like a reader of the NFS path itself
        start = time.monotonic()
        assert access(("read", m.model("llama")))[0]["value"] == digest(b"GGUF-local")
        assert time.monotonic() - start < SERVED_WITHIN
        holder.kill()  # a wait in a FUSE client is killable
        sshfs.cont()
        assert access(("read", m.model("qwen")))[0]["value"] == digest(data)


def test_a_download_ending_while_a_hung_share_is_asked_is_not_fetched_again(mount, router, remote, dirs):
    """Found by the soak (tests/soak.py): an open that waited on a hung shared directory while the model's download
    finished started a second download of a model already in the store."""
    r = router()
    data = gguf_bytes(4 << 20)
    write_model(r.models_dir, "late", data)
    r.control(rate=1 << 20)  # four seconds
    m = mount("--shared", str(dirs["shared"]), "--router", r.url, "--shared-timeout", "3")
    first = subprocess.Popen(["cat", str(m.model("late"))], stdout=subprocess.DEVNULL)
    partial = dirs["store"] / "late" / ".model.gguf.partial"
    wait_for(lambda: partial.exists() and partial.stat().st_size >= (3 << 20), what="most of the download")
    os.stat(m.model("late"))  # the kernel now knows the name for 1 s: the open below goes straight to FUSE_OPEN
    remote.sshfs.stop()  # that open waits on the share (up to 3 s) while the download ends (in about 1 s)
    [second] = access(("read", m.model("late")))
    assert second["value"] == digest(data)
    assert first.wait(timeout=30) == 0
    assert r.blob_gets("late") == 1
    assert m.log_text().count("late: starting a download") == 1


# Runs in a child: stats every path given, each in its own thread, all at once; prints [errno or 0, seconds] each.
_CONCURRENT_STATS = r"""
import json, os, sys, threading, time
results = [None] * (len(sys.argv) - 1)
def one(i, path):
    start = time.monotonic()
    try:
        os.stat(path)
        err = 0
    except OSError as exc:
        err = exc.errno
    results[i] = [err, time.monotonic() - start]
threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(sys.argv[1:])]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


def concurrent_stats(paths: list[Path], timeout: float = 30) -> list[list[float]]:
    proc = subprocess.run([sys.executable, "-c", _CONCURRENT_STATS, *map(str, paths)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


#: A WAN-like server: every request reaches the real sftp-server `delay` seconds late, without limiting how many are
#: in flight (a delay line, not a queue). Run by sshfs on the server side (`-o sftp_server=...`).
_SLOW_SFTP = r"""#!PYTHON
import os, queue, subprocess, sys, threading, time
delay = float(sys.argv[1])
server = subprocess.Popen(["/usr/lib/openssh/sftp-server"], stdin=subprocess.PIPE, stdout=sys.stdout.fileno(),
                          bufsize=0)
line = queue.SimpleQueue()
def read():
    while data := os.read(0, 1 << 16):
        line.put((time.monotonic() + delay, data))
    line.put((0, b""))
threading.Thread(target=read, daemon=True).start()
while True:
    due, data = line.get()
    if not data:
        break
    time.sleep(max(0.0, due - time.monotonic()))
    server.stdin.write(data)
server.stdin.close()
server.wait()
"""


@pytest.fixture
def slow_remote(sshd: Sshd, dirs: dict[str, Path], mount: object, tmp_path: Path) -> Iterator[Remote]:
    """Like `remote`, with 40 ms more on every request to the server: calls are slow but always answered."""
    server_dir = tmp_path / "remote"
    server_dir.mkdir()
    relay = tmp_path / "slow-sftp"
    relay.write_text(_SLOW_SFTP.replace("PYTHON", sys.executable))
    relay.chmod(0o755)
    with SshfsMount(sshd, str(server_dir), str(dirs["shared"]), extra_options=[f"sftp_server={relay} 0.04"]) as fs:
        yield Remote(server_dir, fs)


def test_a_busy_share_with_slow_answers_stays_up(mount, dirs, slow_remote):
    """Every call on the share answers well within --shared-timeout, but far more lookups arrive at once than the
    8 threads of the directory can run: the time spent waiting for a thread is not the server's, so the directory
    is never marked down, by the calls or by the prober (which has a thread of its own)."""
    # One call here takes about 0.3-0.5 s (a few requests of 40 ms each): a timeout well above that keeps a loaded
    # machine from making a slow call look hung, and enough lookups queue for their threads far longer than it.
    timeout = 2.5
    names = [f"m{i}" for i in range(120)]
    for name in names:
        write_model(slow_remote.dir, name, f"GGUF-{name}".encode())
    m = mount(*mount_args(dirs, "--shared-timeout", f"{timeout:g}"))
    results = concurrent_stats([m.model(name) for name in names])
    slowest = max(seconds for _, seconds in results)
    print(f"\n{len(names)} lookups on a share answering every request 40 ms late: slowest {slowest:.2f}s")
    assert [err for err, _ in results] == [0] * len(names), (slowest, m.log_text())
    assert slowest > 1.2 * timeout, f"the lookups did not queue (slowest {slowest:.2f}s): no test"
    assert unavailable_warnings(m.log_text(), dirs["shared"]) == [], m.log_text()
    assert json.loads(os.getxattr(m.path, "user.modelfs.shared"))[0]["available"] is True


def test_a_stopped_share_is_marked_down_in_bounded_time_with_every_thread_stuck(mount, dirs, remote):
    """A hung share with more lookups than threads: the ones running time out after --shared-timeout, the ones
    still waiting for a thread are released when it is marked down; none waits for the server."""
    names = [f"m{i}" for i in range(24)]
    for name in names:
        write_model(remote.dir, name, f"GGUF-{name}".encode())
    write_model(dirs["store"], "local", b"GGUF-local")
    m = mount(*mount_args(dirs))
    remote.sshfs.stop()
    stopped = time.monotonic()
    results = concurrent_stats([m.model(name) for name in names])
    assert {err for err, _ in results} == {2}  # ENOENT: the share is skipped, no source has them
    bound = SHARED_TIMEOUT + 1.0  # the first calls' own timeout, plus scheduling on a busy machine
    assert max(seconds for _, seconds in results) < bound, results
    assert not json.loads(os.getxattr(m.path, "user.modelfs.shared"))[0]["available"]
    assert time.monotonic() - stopped < bound + 1.0
    assert access(("read", m.model("local")))[0]["value"] == digest(b"GGUF-local")
    assert len(unavailable_warnings(m.log_text(), dirs["shared"])) == 1
