"""A daemon restart nobody notices (issue 19), on real mounts read by real processes.

While readers hold a handle in a read loop, hold a mapping of a GGUF model, open a model in a loop and stream a
router model still downloading, the serving daemon is killed with SIGKILL (or handed over by `modelfs restart`):
no reader may see an error, a wrong byte or a signal; the kernel mount stays the same (mount id), and a new
process serves within a few seconds. Also: inode numbers survive, a crash loop ends in EIO (never a hang), a
damaged or forged state gives a clean remount, and nobody but the mount's own daemon can hand the supervisor
descriptors. The systemd side (fd store, restart job) is played by this test against `--foreground` with a
NOTIFY_SOCKET, as systemd would.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs import state
from tests.support.ggufmaker import make_gguf_of_size, tensors_equal
from tests.support.models import gguf_bytes, write_model
from tests.support.mount import MODELFS, fuse_missing
from tests.support.procs import wait_for
from tests.support.sshfs import is_mounted

MB = 1 << 20
pytestmark = pytest.mark.timeout(180)

# Reader processes. Each prints "ready" after its first operation, runs until its deadline, then prints one JSON
# line: operations done, errors (with errno names), wrong bytes seen, and its slowest operation in seconds.
_READERS = r"""
import errno, json, mmap, os, sys, time
kind, path, ref_path, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ref = open(ref_path, "rb").read()
ops = wrong = 0; errors = []; slowest = 0.0; announced = False
def note(dt):
    global slowest, announced, ops
    ops += 1; slowest = max(slowest, dt)
    if not announced:
        print("ready", flush=True); announced = True
deadline = time.monotonic() + seconds
if kind == "read":
    fd = os.open(path, os.O_RDONLY); off = 0
    while time.monotonic() < deadline:
        t = time.monotonic()
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # so reads reach the daemon, not the page cache
            data = os.pread(fd, 1 << 20, off)
            wrong += data != ref[off:off + len(data)]
        except OSError as exc:
            errors.append(errno.errorcode.get(exc.errno, str(exc.errno)))
        note(time.monotonic() - t); off = (off + 3 * (1 << 20) + 4096) % len(ref)
elif kind == "mmap":
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ); off = 0; n = 0
    while time.monotonic() < deadline:
        t = time.monotonic()
        wrong += mm[off:off + 65536] != ref[off:off + 65536]  # a SIGBUS would end this process
        note(time.monotonic() - t); off = (off + 7 * 65536 + 4096) % (len(ref) - 65536); n += 1
        if n % 16 == 0:
            mm.madvise(mmap.MADV_DONTNEED); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
elif kind == "open":
    while time.monotonic() < deadline:
        t = time.monotonic()
        try:
            with open(path, "rb") as f:
                wrong += f.read(65536) != ref[:65536]
        except OSError as exc:
            errors.append(errno.errorcode.get(exc.errno, str(exc.errno)))
        note(time.monotonic() - t); time.sleep(0.01)
elif kind == "stream":
    got = bytearray()
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                t = time.monotonic(); data = f.read(1 << 20)
                note(time.monotonic() - t)
                if not data:
                    break
                got += data
    except OSError as exc:
        errors.append(errno.errorcode.get(exc.errno, str(exc.errno)))
    wrong += bytes(got) != ref
print(json.dumps({"kind": kind, "ops": ops, "errors": errors, "wrong": wrong, "slowest": round(slowest, 3)}))
"""


def status(mountpoint: Path) -> dict:
    return json.loads(os.getxattr(mountpoint, "user.modelfs.status"))


def held(mountpoint: Path) -> dict:
    """The status once the daemon has handed its connection to its holder (with its FUSE_INIT recorded): from then
    on a crash keeps the mount. A daemon killed in the milliseconds before that dies as any FUSE daemon would."""
    wait_for(lambda: status(mountpoint).get("fuse_init") is not None, what="the connection handed to its holder")
    return status(mountpoint)


def mount_id(mountpoint: Path) -> str:
    """The kernel mount's id (first field of /proc/self/mountinfo): a remount would change it."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return fields[0]
    raise AssertionError(f"{mountpoint} is not mounted")


def new_daemon(mountpoint: Path, old_pid: int, timeout: float = 15) -> tuple[dict, float]:
    """Wait until another process serves the mount; its status and how long that took."""
    began = time.monotonic()
    now: dict = {}

    def served() -> bool:
        nonlocal now
        try:
            now = status(mountpoint)
        except OSError:
            return False
        return isinstance(now.get("pid"), int) and now["pid"] != old_pid and now.get("fuse_init") is not None

    wait_for(served, timeout=timeout, what="a new daemon serving the mount")
    return now, time.monotonic() - began


class Readers:
    """Reader processes on one mount, started together and checked together."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, kind: str, path: Path, reference: Path, seconds: float) -> None:
        self.procs.append(subprocess.Popen([sys.executable, "-c", _READERS, kind, str(path), str(reference),
                                            str(seconds)], stdout=subprocess.PIPE, text=True))

    def ready(self) -> None:
        for proc in self.procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", f"reader {proc.args[3]} did not start"

    def results(self, timeout: float = 60) -> list[dict]:
        out = []
        for proc in self.procs:
            stdout, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"reader {proc.args[3]} ended with {proc.returncode} (a signal?)"
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def readers():
    group = Readers()
    yield group
    group.stop()


@pytest.mark.io_paths
@pytest.mark.parametrize("how", ["kill9", "restart"])
def test_readers_see_only_a_pause(mount, router, dirs, readers, how):
    local = write_model(dirs["store"], "org/local", gguf_bytes(24 * MB))
    mapped = dirs["store"] / "org" / "mapped" / "model.gguf"
    make_gguf_of_size(mapped, 24 * MB)
    r = router()
    remote = write_model(r.models_dir, "org/remote", gguf_bytes(16 * MB))
    r.control(rate=2 * MB)  # about 8 s: the crash falls in the middle of the download
    m = mount("--router", r.url)
    before, mid = held(m.path), mount_id(m.path)
    assert before["held_by"] == "supervisor" and before["restarts"] == 0
    readers.start("read", m.model("org/local"), local, 7)
    readers.start("mmap", m.model("org/mapped"), mapped, 7)
    readers.start("open", m.model("org/local"), local, 7)
    readers.start("stream", m.model("org/remote"), remote, 0)
    readers.ready()
    time.sleep(1.5)
    assert (dirs["store"] / "org" / "remote" / ".model.gguf.partial").exists()
    if how == "kill9":
        os.kill(before["pid"], signal.SIGKILL)
    else:
        done = subprocess.run([*MODELFS, "restart", str(m.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "restarted" in done.stdout, done.stderr
    after, took = new_daemon(m.path, before["pid"])
    results = readers.results()
    slowest = ", ".join(f"{x['kind']} {x['slowest']}s" for x in results)
    print(f"\n{how} ({m.env.get('MODELFS_PASSTHROUGH')}): new daemon seen after {took:.3f}s; pause "
          f"{after['last_restart_pause_s']}s; slowest ops {slowest}")
    for result in results:
        assert result["errors"] == [] and result["wrong"] == 0 and result["ops"] > 0, result
    assert took < 10 and after["restarts"] == 1 and after["held_by"] == "supervisor"
    assert mount_id(m.path) == mid  # the same kernel mount: nothing was remounted
    assert tensors_equal(m.model("org/mapped"), mapped)  # GGUFReader through the mount, after the restart
    wait_for((dirs["store"] / "org" / "remote" / "model.gguf").exists, what="the download promoted", timeout=30)
    log = m.log_text()
    assert "resumed" in log and "cannot resume" not in log
    assert ("died (signal SIGKILL)" in log) == (how == "kill9")


def test_bytes_a_resumed_download_has_on_disk_are_served_at_once(mount, router, dirs, readers):
    """A router that honours Range: the restarted download goes on at its gap, far past byte 0. A read of bytes
    the resume record says are on disk, sent while no daemon served, is answered as soon as the new daemon serves,
    not when the download ends."""
    r = router("range")
    remote = write_model(r.models_dir, "big", data := gguf_bytes(16 * MB))
    r.control(rate=MB)  # one stream: about 16 s
    m = mount("--router", r.url, "--passthrough", "off", env={"MODELFS_DOWNLOAD_STREAMS": "1"})
    readers.start("stream", m.model("big"), remote, 0)
    readers.ready()
    sidecar = dirs["store"] / "big" / ".model.gguf.partial.json"

    def recorded() -> int:
        try:
            return sum(end - start for start, end in json.loads(sidecar.read_text())["ranges"])
        except (OSError, ValueError, KeyError):
            return 0

    wait_for(lambda: recorded() >= 3 * MB, timeout=30, what="3 MiB recorded")
    before = held(m.path)
    os.kill(before["pid"], signal.SIGKILL)
    # While no daemon serves: a new reader of the first MiB (on disk, recorded), its page cache dropped.
    early = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                              "os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); t = time.monotonic(); "
                              "d = os.pread(fd, 1 << 20, 0); print(time.monotonic() - t, len(d), flush=True); "
                              "sys.stdout.buffer.write(d)", str(m.model("big"))], stdout=subprocess.PIPE)
    new_daemon(m.path, before["pid"])
    out, _ = early.communicate(timeout=60)
    seconds, size = out.split(b"\n", 1)[0].split()
    assert out.split(b"\n", 1)[1] == data[:MB] and int(size) == MB
    assert float(seconds) < 5, f"the first MiB took {float(seconds):.1f}s: it waited for the download"
    for result in readers.results(timeout=90):
        assert result["errors"] == [] and result["wrong"] == 0, result
    second = [q for q in r.stats()["requests"] if q["method"] == "GET" and q["name"] == "big"][1:]
    assert second and all(q["status"] == 206 for q in second)  # resumed, not fetched again from byte 0


def test_inode_numbers_and_open_files_survive_a_compacted_journal(mount, dirs):
    """Thousands of names make the journal compact (a new memory file at the holder) before the crash."""
    data = gguf_bytes(8192)
    for i in range(6000):
        write_model(dirs["store"], f"many/m{i:05d}", data, flat=True)
    m = mount()
    inodes = {i: os.stat(m.model(f"many/m{i:05d}")).st_ino for i in range(6000)}
    kept = open(m.model("many/m00007"), "rb", buffering=0)
    before = held(m.path)
    assert before["inodes"]["versions"] >= 6000
    os.kill(before["pid"], signal.SIGKILL)
    new_daemon(m.path, before["pid"])
    time.sleep(1.1)  # past the kernel's entry cache: lookups reach the new daemon
    again = {i: os.stat(m.model(f"many/m{i:05d}")).st_ino for i in range(0, 6000, 97)}
    assert again == {i: inodes[i] for i in again}
    assert kept.read() == data
    kept.close()
    fresh = write_model(dirs["store"], "many/new", data, flat=True)
    assert os.stat(m.model("many/new")).st_ino not in inodes.values()  # numbers never come back
    assert fresh.exists()
    assert "restart journal compacted" in m.log_text()  # the daemon that resumed read a compacted journal


@pytest.mark.io_paths
def test_a_handle_whose_file_was_replaced_keeps_its_version_or_gets_eio(mount, dirs, io):
    """What cannot survive a crash, stated in SEMANTICS.md: a daemon-path handle whose file was replaced (so unlinked)
    has nothing left to reopen and reads EIO, never the new file's bytes. A passthrough handle reads its own file
    from the kernel and never notices."""
    old = gguf_bytes(2 * MB, seed=1)
    path = write_model(dirs["store"], "m", old)
    m = mount()
    m.expected_errors.append("was replaced or removed while no daemon served the mount")
    handle = open(m.model("m"), "rb", buffering=0)
    assert handle.read(4096) == old[:4096]
    new = gguf_bytes(2 * MB, seed=2)
    staged = path.with_name("staged")
    staged.write_bytes(new)
    staged.rename(path)  # the usual replacement: the old file is unlinked, only open handles keep it
    pid = held(m.path)["pid"]
    os.kill(pid, signal.SIGKILL)
    new_daemon(m.path, pid)
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if io == "passthrough":
        assert os.pread(handle.fileno(), MB, MB) == old[MB:]
    else:
        with pytest.raises(OSError) as gone:
            os.pread(handle.fileno(), MB, MB)
        assert gone.value.errno == errno.EIO
    time.sleep(1.1)  # the kernel's cached entry expires: the name is looked up again
    assert m.model("m").read_bytes() == new
    handle.close()


def test_a_crash_loop_ends_in_eio_and_restart_recovers(mount, dirs, tmp_path):
    config = tmp_path / "modelfs.toml"
    config.write_text(f'store = "{dirs["store"]}"\n')
    write_model(dirs["store"], "m", data := gguf_bytes(MB))
    m = mount("--config", str(config), "--passthrough", "off")  # (a passthrough handle would not even notice)
    m.expected_errors += ["giving up", "modelfs: "]  # the supervisor's verdict; the daemons' config complaints
    handle = open(m.model("m"), "rb", buffering=0)
    assert handle.read(4096) == data[:4096]
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # reads must reach userspace
    pid = held(m.path)["pid"]
    config.write_text("store = [not toml\n")  # every new daemon now fails at once
    began = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "giving up" in m.log_text(), timeout=40, what="the supervisor giving up")
    print(f"\ncrash loop ended after {time.monotonic() - began:.1f}s")
    for attempt in (lambda: os.pread(handle.fileno(), 4096, MB // 2), lambda: open(m.model("m"), "rb"),
                    lambda: os.stat(m.path / "x")):
        t = time.monotonic()
        with pytest.raises(OSError) as failed:
            attempt()
        assert failed.value.errno == errno.EIO and time.monotonic() - t < 2
    failed_status = status(m.path)
    assert failed_status["state"] == "failed" and "6 times in a row" in failed_status["reason"]
    human = subprocess.run([*MODELFS, "status", str(m.path)], capture_output=True, text=True, timeout=30)
    assert human.returncode == 1 and "FAILED, every request gets EIO" in human.stdout, (human.stdout, human.stderr)
    config.write_text(f'store = "{dirs["store"]}"\n')  # fixed: `modelfs restart` tries again
    done = subprocess.run([*MODELFS, "restart", str(m.path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    handle.seek(0)
    assert handle.read() == data  # the handle from before the crash loop reads again
    handle.close()


def state_fd_of(pid: int) -> Path:
    """The state journal the supervisor holds, as /proc/PID/fd/N (root may open it: that is the test's tamper)."""
    for link in Path(f"/proc/{pid}/fd").iterdir():
        if "memfd:modelfs-state" in os.readlink(link):
            return link
    raise AssertionError("the supervisor holds no state")


@pytest.mark.parametrize("damage", ["flip", "truncate", "forge"])
def test_a_damaged_or_forged_state_gives_a_clean_remount(mount, dirs, damage):
    write_model(dirs["store"], "m", data := gguf_bytes(MB))
    m = mount("--passthrough", "off")  # a passthrough handle would go on reading its own file from the kernel
    m.expected_errors.append("cannot resume")
    handle = open(m.model("m"), "rb", buffering=0)
    handle.read(4096)
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    before, mid = held(m.path), mount_id(m.path)
    fd = os.open(state_fd_of(before["supervisor_pid"]), os.O_RDWR)
    size = os.fstat(fd).st_size
    if damage == "flip":
        byte = os.pread(fd, 1, size - 10)
        os.pwrite(fd, bytes([byte[0] ^ 1]), size - 10)
    elif damage == "truncate":
        os.ftruncate(fd, size - 7)
    else:  # valid frames, a file outside the store: as someone able to write the memory file might try
        generation, length, _ = state.read(fd)
        journal = state.Journal(fd, generation, length)
        journal.append(state.SavedVersion(99, "m.gguf", "local", "/etc/shadow", 10, 1, (1, 2, 10, 1), True)
                       .record())
        journal.append({"t": "open", "fh": 99, "i": 99, "b": 0})
    os.close(fd)
    os.kill(before["pid"], signal.SIGKILL)
    new_daemon(m.path, before["pid"])
    assert mount_id(m.path) != mid  # a new mount, as the log says
    log = m.log_text()
    reason = {"flip": "checksum mismatch", "truncate": "truncated", "forge": "'/etc/shadow' is not model"}[damage]
    assert "cannot resume" in log and reason in log and "remounting" in log
    assert m.model("m").read_bytes() == data  # new opens work
    with pytest.raises(OSError) as old:
        os.pread(handle.fileno(), 4096, MB // 2)  # the handle on the old connection: an error, never other bytes
    assert old.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    with contextlib.suppress(OSError):  # its flush on the old connection fails too
        handle.close()


def test_only_the_daemon_may_hand_the_supervisor_descriptors(mount, dirs, tmp_path):
    write_model(dirs["store"], "m", data := gguf_bytes(MB))
    m = mount()
    before = held(m.path)
    socket_path = Path(f"/run/modelfs/supervisor-{before['supervisor_pid']}.sock")
    assert oct(socket_path.parent.stat().st_mode & 0o777) == "0o700" and socket_path.exists()
    # Not root: the directory keeps everyone else out.
    nobody = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
                             "-c", f"import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).connect("
                             f"{str(socket_path)!r})"], capture_output=True, text=True)
    assert nobody.returncode != 0 and "Permission denied" in nobody.stderr
    # Root, but not the daemon: a forged state and a bogus connection offered are refused.
    forged = state.Journal.create(9)
    forged.extend([{"t": "mount", "mountpoint": str(m.path), "started_ns": 1}])
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, open("/dev/null") as bogus:
        sock.sendmsg([b"FDSTORE=1\nFDNAME=state-9"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", [forged.fd]))], 0, str(socket_path))
        sock.sendmsg([b"FDSTORE=1\nFDNAME=fuse"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", [bogus.fileno()]))], 0, str(socket_path))
    wait_for(lambda: m.log_text().count("ignoring a notification from pid") >= 2, what="the supervisor refusing")
    os.kill(before["pid"], signal.SIGKILL)
    after, _ = new_daemon(m.path, before["pid"])
    assert after["restarts"] == 1 and m.model("m").read_bytes() == data
    assert "cannot resume" not in m.log_text()


def test_status_and_metrics_name_the_daemon_and_count_restarts(mount, dirs):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    m = mount("--metrics", f"127.0.0.1:{port}")

    def scrape() -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    first = held(m.path)
    assert first["pid"] != first["supervisor_pid"] and first["restarts"] == 0
    assert Path(f"/proc/{first['pid']}/cmdline").read_bytes().count(b"modelfs")
    samples = scrape()
    assert samples[("modelfs_restarts", ())] == 0
    assert samples[("modelfs_daemon_info", (("held_by", "supervisor"), ("pid", str(first["pid"]))))] == 1
    for n in (1, 2):
        pid = status(m.path)["pid"]
        os.kill(pid, signal.SIGKILL)
        now, _ = new_daemon(m.path, pid)
        assert now["restarts"] == n and now["supervisor_pid"] == first["supervisor_pid"]
    wait_for(lambda: scrape().get(("modelfs_restarts", ())) == 2, what="the metrics of the third daemon")
    samples = scrape()
    assert samples[("modelfs_daemon_info", (("held_by", "supervisor"), ("pid", str(now["pid"]))))] == 1
    assert 0 < samples[("modelfs_restart_pause_seconds", ())] < 10
    human = subprocess.run([*MODELFS, "status", str(m.path)], capture_output=True, text=True, timeout=30).stdout
    assert (f"daemon  pid {now['pid']} (connection held by supervisor pid {first['supervisor_pid']}), 2 restarts, "
            "last pause ") in human, human


def test_restart_refuses_a_modelfs_that_would_negotiate_differently(mount, dirs):
    m = mount()
    pid = status(m.path)["pid"]
    # A "newer" modelfs asking the kernel for another background limit: it could not serve this connection.
    newer = ("import sys, modelfs.fs as fs; fs.ModelFS.max_background = 64; from modelfs.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
    refused = subprocess.run([sys.executable, "-c", newer, "restart", str(m.path)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "not restarted" in refused.stderr and "max_background 0x40" in \
        refused.stderr, refused.stderr
    assert status(m.path)["pid"] == pid  # the running daemon was left alone
    # Nor one that would not read this mount's journal.
    newer = ("import sys, modelfs.state as state; state.VERSION += 1; from modelfs.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
    refused = subprocess.run([sys.executable, "-c", newer, "restart", str(m.path)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "journal in format 1" in refused.stderr, refused.stderr
    assert status(m.path)["pid"] == pid


def test_restart_refuses_a_mount_nothing_holds(mount, dirs):
    m = mount("--no-supervisor")
    assert status(m.path)["held_by"] == "none" and status(m.path)["pid"] == m.proc.pid
    refused = subprocess.run([*MODELFS, "restart", str(m.path)], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "nothing holds" in refused.stderr
    assert is_mounted(str(m.path))


def test_the_daemon_gets_the_router_key_by_environment_never_by_command_line(mount, router):
    r = router(token="s3cret-key")
    write_model(r.models_dir, "private", data := gguf_bytes(MB))
    m = mount("--router", r.url, "--router-token", "s3cret-key", "--shared-timeout", "3")
    assert m.model("private").read_bytes() == data
    daemon = status(m.path)["pid"]
    cmdline = Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")
    assert b"s3cret-key" not in b" ".join(cmdline) and b"--shared-timeout" in cmdline  # the other flags are kept
    assert b"MODELFS_ROUTER_TOKEN=s3cret-key" in Path(f"/proc/{daemon}/environ").read_bytes()


def test_killing_the_supervisor_leaves_a_stale_mount_as_before(mount, dirs, tmp_path):
    m = mount()
    daemon, supervisor = status(m.path)["pid"], status(m.path)["supervisor_pid"]
    assert m.proc is not None and m.proc.pid == supervisor
    m.proc.kill()  # the foreground process is the supervisor: its daemon dies with it
    m.proc.wait(timeout=10)
    wait_for(lambda: not Path(f"/proc/{daemon}").exists(), what="the daemon to die with its supervisor")
    from modelfs.fusermount import is_stale

    wait_for(lambda: is_stale(m.path), timeout=5, what="the stale mount")
    # The killed supervisor's socket is left behind; the next supervisor removes it.
    left = Path(f"/run/modelfs/supervisor-{supervisor}.sock")
    assert left.exists()
    mount(mountpoint=tmp_path / "other")
    assert not left.exists()


def test_background_mount_restarts_its_daemon(dirs, tmp_path):
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    write_model(dirs["store"], "m", data := gguf_bytes(MB))
    log = tmp_path / "bg.log"
    started = subprocess.run([*MODELFS, "mount", str(dirs["mnt"]), "--store", str(dirs["store"]), "--log-file",
                              str(log)], capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0 and "(pid " in started.stdout, started.stderr
        supervisor = int(started.stdout.split("(pid ")[1].split(",")[0])
        assert status(dirs["mnt"])["supervisor_pid"] == supervisor
        pid = status(dirs["mnt"])["pid"]
        os.kill(pid, signal.SIGKILL)
        new_daemon(dirs["mnt"], pid)
        assert (dirs["mnt"] / "m.gguf").read_bytes() == data
    finally:
        subprocess.run([*MODELFS, "umount", str(dirs["mnt"])], capture_output=True, timeout=30)
    wait_for(lambda: not is_mounted(str(dirs["mnt"])), what="the unmount")
    wait_for(lambda: not Path(f"/proc/{supervisor}").exists(), what="the supervisor to exit")
    assert "Traceback" not in log.read_text()


# --------------------------------------------------------------------------- the systemd side, played by the test


class FakeSystemd:
    """systemd's part for one Type=notify service with FileDescriptorStoreMax=: a NOTIFY_SOCKET that keeps the
    FDSTORE=1 descriptors (by name, FDSTOREREMOVE honoured) and starts the service again with them in
    LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID. Written from sd_notify(3) and sd_listen_fds(3), not from the supervisor."""

    def __init__(self, tmp: Path, command: list[str]) -> None:
        self.command = command
        self.log = tmp / "service.log"
        self.sock_path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.05)
        self.store: dict[str, list[int]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False

    def start(self) -> None:
        stored = [(name, fd) for name, fds in self.store.items() for fd in fds]
        # bash places the stored descriptors at 3, 4, ... and execs modelfs with its own pid in LISTEN_PID.
        moves = " ".join(f"{3 + i}<&{fd}" for i, (_, fd) in enumerate(stored))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS", "LISTEN_", "NOTIFY_"))}
        env["NOTIFY_SOCKET"] = str(self.sock_path)
        script = 'exec "$@"'
        if stored:
            env.update(LISTEN_FDS=str(len(stored)), LISTEN_FDNAMES=":".join(name for name, _ in stored))
            script = f'exec {moves}; LISTEN_PID=$$ exec "$@"'
        self.ready = False
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, "bash", *self.command], env=env, stdout=log,
                                         stderr=log, pass_fds=[fd for _, fd in stored])

    def pump(self, until_ready: bool = True, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (until_ready and self.ready):
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except TimeoutError:
                if not until_ready:
                    return
                continue
            fds = [fd for level, kind, payload in ancillary if level == socket.SOL_SOCKET and
                   kind == socket.SCM_RIGHTS for fd in array.array("i", payload[:len(payload) // 4 * 4])]
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(fields.get("FDNAME", ""), []):
                    os.close(fd)
            if fields.get("FDSTORE") == "1":
                self.store.setdefault(fields.get("FDNAME", "stored"), []).extend(fds)
            else:
                for fd in fds:
                    os.close(fd)
            self.ready = self.ready or fields.get("READY") == "1"
        assert not until_ready or self.ready, f"no READY=1:\n{self.log.read_text()}"

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()
        self.sock.close()


def test_systemd_fd_store_keeps_the_mount_across_a_crash_and_a_restart_job(dirs, tmp_path, readers):
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    model = write_model(dirs["store"], "m", gguf_bytes(16 * MB))
    service = FakeSystemd(tmp_path, [*MODELFS, "mount", str(dirs["mnt"]), "--store", str(dirs["store"]),
                                     "--foreground", "--passthrough", "off"])
    try:
        service.start()
        service.pump()
        assert set(service.store) == {"fuse", "state-1"}  # the connection and its journal, in the fd store
        first, mid = status(dirs["mnt"]), mount_id(dirs["mnt"])
        assert first["held_by"] == "service manager" and first["pid"] == service.proc.pid
        readers.start("read", dirs["mnt"] / "m.gguf", model, 8)
        readers.start("open", dirs["mnt"] / "m.gguf", model, 8)
        readers.ready()
        # A crash: Restart=on-failure starts the unit again, with the fd store in LISTEN_FDS.
        os.kill(first["pid"], signal.SIGKILL)
        service.proc.wait(timeout=10)
        service.start()
        service.pump()
        second, _ = new_daemon(dirs["mnt"], first["pid"])
        # `systemctl restart`: RestartKillSignal=SIGUSR1, the old daemon drains and exits 75, the job starts it again.
        os.kill(second["pid"], signal.SIGUSR1)
        assert service.proc.wait(timeout=15) == 75
        service.pump(until_ready=False, timeout=0.2)
        service.start()
        service.pump()
        third, _ = new_daemon(dirs["mnt"], second["pid"])
        for result in readers.results():
            assert result["errors"] == [] and result["wrong"] == 0, result
        assert third["restarts"] == 2 and mount_id(dirs["mnt"]) == mid
        # `systemctl stop`: SIGTERM unmounts and exits 0; systemd then drops the store.
        os.kill(third["pid"], signal.SIGTERM)
        assert service.proc.wait(timeout=15) == 0
        assert not is_mounted(str(dirs["mnt"]))
        log = service.log.read_text()
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait()
        service.close()
        if is_mounted(str(dirs["mnt"])):
            subprocess.run(["fusermount3", "-u", "-z", str(dirs["mnt"])], capture_output=True)


def test_pause_figures(mount, dirs, readers):
    """The pause a reader sees, crash and planned restart, over several runs (printed; run with -s)."""
    model = write_model(dirs["store"], "m", gguf_bytes(8 * MB))
    m = mount("--passthrough", "off")
    figures: dict[str, list[float]] = {"kill9": [], "restart": []}
    for how in ("kill9", "restart") * 5:
        pid = held(m.path)["pid"]
        if how == "kill9":
            os.kill(pid, signal.SIGKILL)
        else:
            subprocess.run([*MODELFS, "restart", str(m.path)], capture_output=True, timeout=60, check=True)
        now, _ = new_daemon(m.path, pid)
        figures[how].append(now["last_restart_pause_s"])
        assert (m.path / "m.gguf").read_bytes()[:4096] == model.read_bytes()[:4096]
    for how, values in figures.items():
        print(f"\n{how}: pause median {statistics.median(values):.3f}s, min {min(values):.3f}s, "
              f"max {max(values):.3f}s over {len(values)}")
        assert max(values) < 10


def test_semantics_doc_names_the_restart_tests():
    """docs/SEMANTICS.md's Restarts section cites a test for each case; each must exist here."""
    import re

    doc = (Path(__file__).parent.parent / "docs" / "SEMANTICS.md").read_text()
    section = doc.split("## Restarts: what a new daemon serves", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    source = Path(__file__).read_text()
    assert len(named) >= 8
    assert not [name for name in named if f"def {name}(" not in source]
