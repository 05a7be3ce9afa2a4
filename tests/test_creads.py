"""Requests answered in C by the patched pyfuse3 (patches/pyfuse3/0005, 0006), on real mounts: reads of complete
local files on the daemon path (right at every offset, counted by pyfuse3, never for shared files or downloads in
progress, the backing file not cached twice), reads of a download in progress replied from its partial file once
Python waited for their bytes (right at every offset, counted, never for shared files), and getxattr of names
modelfs does not serve."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

MB = 1 << 20

pytestmark = pytest.mark.io_paths


def c_answers(mnt: Path) -> dict[str, int]:
    """What the daemon's pyfuse3 answered in C so far, from the root's status xattr."""
    return dict(json.loads(os.getxattr(mnt, "user.modelfs.status"))["c_answers"])


def read_through(path: Path) -> bytes:
    """Read the whole file in a fresh open, dropping the mount's cached pages first so every byte is requested."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (mincore of a mapping, which faults nothing in)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_local_reads_are_answered_in_c_and_right_at_every_offset(mount, dirs, io):
    data = gguf_bytes(8 * MB + 12345)  # not a whole number of pages
    write_model(dirs["store"], "m", data)
    m = mount()
    before = c_answers(m.path)
    with open(m.model("m"), "rb") as f:
        assert os.getxattr(m.model("m"), "user.modelfs.io").decode() == io
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        rng = random.Random(7)
        for _ in range(300):
            offset = rng.randrange(len(data) + 10)
            size = rng.choice((1, 100, 4095, 4096, 4097, 65536 + 3, MB, 3 * MB))
            assert os.pread(f.fileno(), size, offset) == data[offset:offset + size], (offset, size)
        assert os.pread(f.fileno(), 10, len(data)) == b""
        f.seek(0)
        assert f.read() == data
    after = c_answers(m.path)
    if io == "daemon":
        assert after["reads"] > before["reads"]
        assert after["read_bytes"] - before["read_bytes"] >= len(data)  # every byte once at least, none in Python
    else:
        assert after["reads"] == before["reads"] == 0  # the kernel read the backing file itself
    assert m.model("m").read_bytes() == data


def test_shared_files_and_downloads_in_progress_never_take_the_c_path(mount, router, dirs, io):
    local, shared, remote = gguf_bytes(2 * MB, seed=1), gguf_bytes(3 * MB, seed=2), gguf_bytes(4 * MB, seed=3)
    write_model(dirs["store"], "loc", local)
    write_model(dirs["shared"], "sha", shared)
    r = router()
    write_model(r.models_dir, "rem", remote)
    r.control(rate=4 * MB)  # the download is still running while the reader streams it
    m = mount("--shared", str(dirs["shared"]), "--router", r.url)

    start = c_answers(m.path)
    assert read_through(m.model("sha")) == shared
    after_shared = c_answers(m.path)
    # Neither registered for C reads nor replied from a file range: a shared file's reads stay in worker threads.
    assert after_shared == start, "a shared file was read in C"
    assert read_through(m.model("rem")) == remote
    after_remote = c_answers(m.path)
    assert after_remote["reads"] == start["reads"], "a download in progress was registered for reads in C"
    # Its reads wait in Python; their replies come from the partial file (patch 0006), every byte of it.
    assert after_remote["range_bytes"] - start["range_bytes"] >= len(remote)

    # The finished download is a local file now: a new open reads it in C on the daemon path.
    wait_for((dirs["store"] / "rem" / "model.gguf").exists, timeout=30, what="promotion into the store")
    assert read_through(m.model("rem")) == remote
    assert read_through(m.model("loc")) == local
    end = c_answers(m.path)
    if io == "daemon":
        assert end["read_bytes"] - after_remote["read_bytes"] >= len(remote) + len(local)
    else:
        assert end["reads"] == 0
    # The shared file is still read in Python (worker threads) after the local ones were read in C.
    assert read_through(m.model("sha")) == shared
    assert c_answers(m.path) == end


def test_reads_of_a_download_in_progress_are_replied_from_its_partial_file(mount, router, dirs, io):
    """Once a read's bytes are on disk, pyfuse3 replies from the partial file (patch 0006): right at every offset,
    across the file's end and past it, while the download runs and after it was promoted (the handle keeps its
    download's descriptor, the file renamed into the store), and counted as such, never as a registered read."""
    data = gguf_bytes(12 * MB + 4321, seed=8)  # not a whole number of pages
    r = router()  # one stream from byte 0 (no Range): far reads wait for it
    write_model(r.models_dir, "dl", data)
    r.control(rate=3 * MB)  # about 4 s
    m = mount("--router", r.url)
    final = dirs["store"] / "dl" / "model.gguf"
    before = c_answers(m.path)
    with open(m.model("dl"), "rb") as f:
        assert os.pread(f.fileno(), 4096, 0) == data[:4096]
        early = c_answers(m.path)
        assert not final.exists(), "the download ended before the first read was answered"
        assert early["range_replies"] > before["range_replies"], "a read in progress was not replied from the file"
        rng = random.Random(9)
        reads = [(rng.randrange(len(data) + 10), rng.choice((1, 100, 4095, 4096, 4097, 65536 + 3, MB, 3 * MB)))
                 for _ in range(80)]
        # The first 60 in the order the download reaches their ends, so that they run while it does however fast
        # the promotion follows its last byte (a read of the last bytes waits for the whole download); the rest
        # in random order, some of them far ahead.
        reads[:60] = sorted(reads[:60], key=lambda read: read[0] + read[1])
        in_progress = 0
        for offset, size in reads:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # every read reaches the daemon
            running = not final.exists()
            assert os.pread(f.fileno(), size, offset) == data[offset:offset + size], (offset, size)
            in_progress += running
        assert in_progress >= 10, f"only {in_progress} reads while the download ran"
        wait_for(final.exists, timeout=30, what="promotion into the store")
        mid = c_answers(m.path)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek(0)
        assert f.read() == data  # the same handle after promotion: still its download's reader
        assert os.pread(f.fileno(), 10, len(data)) == b""
    after = c_answers(m.path)
    assert after["range_bytes"] - mid["range_bytes"] >= len(data)
    assert after["reads"] == before["reads"], "a download's handle was registered for reads in C"
    assert m.model("dl").read_bytes() == data


def test_pages_served_while_downloading_stay_cached_when_the_mtime_changes(mount, router, dirs, io):
    """A router model's mtime is the mount's start until its download starts (docs/SEMANTICS.md): the kernel learns
    the new one once its attributes expire, and must keep the pages it already has (patched pyfuse3, 0007), or every
    page served and not yet read is asked for again (64 readers of a cold model: 14-20% of it twice)."""
    data = gguf_bytes(8 * MB, seed=10)
    r = router()
    write_model(r.models_dir, "m", data)
    r.control(rate=2 * MB)  # the download runs through the whole test
    m = mount("--router", r.url)
    looked_up = os.stat(m.model("m")).st_mtime_ns
    final = dirs["store"] / "m" / "model.gguf"
    with open(m.model("m"), "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: the kernel asks for what is read
        assert os.pread(f.fileno(), 2 * MB, 0) == data[:2 * MB]
        served = c_answers(m.path)["range_bytes"]
        assert served == 2 * MB
        time.sleep(1.5)  # past the attribute timeout (1 s): the next read refreshes them
        assert os.fstat(f.fileno()).st_mtime_ns != looked_up, "the mtime did not change: nothing tested"
        assert os.pread(f.fileno(), 2 * MB, 0) == data[:2 * MB]
        assert not final.exists(), "the download ended before the test did"
        again = c_answers(m.path)["range_bytes"] - served
        # Without 0007 the kernel drops the file's pages and all 2 MiB are asked for again. With it, about one run
        # in 16 on the passthrough mount saw a few folios (8-32 KiB) asked again, the daemon-path mount none; why
        # is not known yet (docs/performance.md), so the check is that the pages were kept, not that each was.
        assert again < served // 8, f"{again} bytes of the {served} already served were asked for again"


def test_a_model_read_in_c_is_cached_once(mount, dirs, io):
    """The C path drops the backing file's pages behind the reader and at close, as the Python path does: the
    model stays cached in the mount's page cache only (with passthrough the kernel caches the backing file)."""
    if io == "passthrough":
        pytest.skip("with passthrough the mount's pages are the backing file's")
    data = gguf_bytes(64 * MB, seed=4)
    backing = write_model(dirs["store"], "big", data)
    os.sync()  # dirty pages cannot be dropped
    m = mount()
    with open(m.model("big"), "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read(48 * MB) == data[:48 * MB]
        assert cached_bytes(backing) <= 40 * MB, "no pages dropped behind the reader"
        assert f.read() == data[48 * MB:]
    assert c_answers(m.path)["read_bytes"] >= len(data)
    assert cached_bytes(backing) <= 2 * MB, "the range read was not dropped at close"
    assert cached_bytes(m.model("big")) >= len(data) - 2 * MB, "the mount's pages were not kept"


def test_getxattr_of_names_modelfs_does_not_serve_is_answered_in_c(mount, dirs, io):
    write_model(dirs["store"], "org/m", gguf_bytes(MB))
    m = mount()
    before = c_answers(m.path)["xattr_enodata"]
    foreign = ("security.selinux", "system.posix_acl_access", "system.posix_acl_default", "user.other",
               "trusted.overlay.opaque", "user.modelfsx")
    for path in (m.path, m.path / "org", m.model("org/m")):
        for name in foreign:
            with pytest.raises(OSError) as exc:
                os.getxattr(path, name)
            assert exc.value.errno == errno.ENODATA, (path, name)
    assert c_answers(m.path)["xattr_enodata"] - before == 3 * len(foreign)
    # The names modelfs serves still reach it.
    assert os.getxattr(m.model("org/m"), "user.modelfs.source") == b"local"
    with pytest.raises(OSError) as exc:
        os.getxattr(m.model("org/m"), "user.modelfs.nothing")
    assert exc.value.errno == errno.ENODATA
    # `ls -l` of coreutils 9.1 (Debian 12) asks every entry for security.selinux and an ACL name: answered in C.
    # coreutils 9.7 (Debian 13) asks llistxattr instead, and getxattr only of names listed (seen with strace).
    before = c_answers(m.path)["xattr_enodata"]
    listing = subprocess.run(["ls", "-lR", str(m.path)], capture_output=True, text=True, check=True).stdout
    assert "m.gguf" in listing
    asked_in_c = c_answers(m.path)["xattr_enodata"] - before
    version = coreutils_version()
    if version <= (9, 1):
        assert asked_in_c >= 3, "ls -l's getxattr of foreign names did not reach the C answer"
    elif version >= (9, 7):
        assert asked_in_c == 0, f"coreutils {version} was expected to list, not to ask getxattr"


def coreutils_version() -> tuple[int, ...]:
    first = subprocess.run(["ls", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return tuple(int(part) for part in first.split()[-1].split("."))


def test_requests_answered_in_python_are_served_while_reads_stream_in_c(mount, dirs, io):
    """The session loop takes requests answered in C back to back; one that needs Python still gets its turn."""
    data = gguf_bytes(32 * MB, seed=6)
    write_model(dirs["store"], "stream", data)
    write_model(dirs["store"], "other", gguf_bytes(MB, seed=7))
    m = mount()
    done = threading.Event()
    passes = []

    def stream() -> None:
        while not done.is_set():
            passes.append(read_through(m.model("stream")) == data)

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        slowest = 0.0
        for _ in range(200):
            started = time.monotonic()
            assert os.getxattr(m.model("other"), "user.modelfs.source") == b"local"  # answered in Python
            slowest = max(slowest, time.monotonic() - started)
    finally:
        done.set()
        reader.join(timeout=60)
    assert passes and all(passes)
    assert slowest < 1.0, f"a getxattr waited {slowest:.2f} s behind reads answered in C"
    if io == "daemon":
        assert c_answers(m.path)["read_bytes"] >= len(data)
