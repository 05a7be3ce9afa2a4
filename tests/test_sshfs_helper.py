"""Quick checks that tests/sshfs.py really behaves like a flaky NFS export: bytes come
through intact, remote changes show up at once, a stopped sshfs hangs callers, a killed
one gives ENOTCONN, and cleanup always leaves no mount behind.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import eventually
from tests.support.sshfs import Sshd, SshfsMount, sshfs_available

_REASON = sshfs_available()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    """One sshd for the whole file: starting it is the slow part."""
    with Sshd() as server:
        yield server


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(remote_dir, mountpoint) in a fresh temp dir."""
    remote = tmp_path / "remote"
    remote.mkdir()
    return remote, tmp_path / "mnt"


def in_proc_mounts(path: Path) -> bool:
    """Whether `path` is a mountpoint, without touching it."""
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def stat_in_subprocess(path: Path, timeout: float) -> int | None:
    """`stat path` in a child, so a hang can't block this process: its exit code, or
    None if it was still blocked after `timeout` seconds (then it is SIGKILLed)."""
    proc = subprocess.Popen(["stat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # a FUSE wait is killable, so this does not hang
        proc.wait(timeout=5)
        return None


def test_reads_byte_identical(sshd: Sshd, dirs: tuple[Path, Path]) -> None:
    remote, mnt = dirs
    data = os.urandom(3 * 1024 * 1024 + 123)
    (remote / "model.bin").write_bytes(data)
    with SshfsMount(sshd, str(remote), str(mnt)):
        assert (mnt / "model.bin").read_bytes() == data
        with open(mnt / "model.bin", "rb") as f:
            f.seek(1_000_000)
            assert f.read(4096) == data[1_000_000:1_004_096]


@pytest.mark.parametrize("direct_io", [True, False])
def test_remote_changes_seen_on_next_open(
    sshd: Sshd, dirs: tuple[Path, Path], direct_io: bool
) -> None:
    remote, mnt = dirs
    (remote / "f").write_bytes(b"version one")
    with SshfsMount(sshd, str(remote), str(mnt), direct_io=direct_io):
        assert (mnt / "f").read_bytes() == b"version one"

        (remote / "f").write_bytes(b"VERSION TWO")  # same size, rewritten in place
        assert eventually(lambda: (mnt / "f").read_bytes() == b"VERSION TWO", 1.0)

        (remote / "f.tmp").write_bytes(b"three, longer than before")
        os.replace(remote / "f.tmp", remote / "f")
        assert eventually(lambda: (mnt / "f").read_bytes() == b"three, longer than before", 1.0)
        assert (mnt / "f").stat().st_size == len(b"three, longer than before")

        (remote / "f").unlink()
        assert eventually(lambda: not (mnt / "f").exists(), 1.0)
        (remote / "f").write_bytes(b"back")  # negative lookups are not cached either
        assert eventually(lambda: (mnt / "f").exists(), 1.0)


def test_stop_hangs_and_cont_resumes(sshd: Sshd, dirs: tuple[Path, Path]) -> None:
    remote, mnt = dirs
    (remote / "f").write_bytes(b"x")
    with SshfsMount(sshd, str(remote), str(mnt)) as m:
        assert stat_in_subprocess(mnt / "f", timeout=5) == 0
        m.stop()
        assert stat_in_subprocess(mnt / "f", timeout=1) is None, "stat should hang"
        m.cont()
        assert stat_in_subprocess(mnt / "f", timeout=5) == 0
        assert (mnt / "f").read_bytes() == b"x"


def test_kill_gives_enotconn(sshd: Sshd, dirs: tuple[Path, Path]) -> None:
    remote, mnt = dirs
    (remote / "f").write_bytes(b"x")
    with SshfsMount(sshd, str(remote), str(mnt)) as m:
        m.kill()
        for path in (mnt, mnt / "f"):
            with pytest.raises(OSError) as info:
                os.stat(path)
            assert info.value.errno == errno.ENOTCONN
        assert in_proc_mounts(mnt)  # still mounted, just dead: like a lost NFS server


@pytest.mark.parametrize("state", ["running", "stopped", "killed"])
def test_cleanup_leaves_no_mount(sshd: Sshd, dirs: tuple[Path, Path], state: str) -> None:
    remote, mnt = dirs
    start = time.monotonic()
    with SshfsMount(sshd, str(remote), str(mnt)) as m:
        assert in_proc_mounts(mnt)
        if state == "stopped":
            m.stop()
        elif state == "killed":
            m.kill()
    assert not in_proc_mounts(mnt)
    assert m.proc is not None and m.proc.poll() is not None
    assert time.monotonic() - start < 10
    assert os.listdir(mnt) == []  # the plain, empty directory again
