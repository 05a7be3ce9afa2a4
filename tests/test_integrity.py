"""A handle keeps the file it opened: a reader never gets bytes of two versions of a model.

Reader A (a real process) opens a model and reads, or mmaps and touches, its first MiB; the model is then replaced
the usual way (a new file renamed over it, same size); reader B opens the name and must get the new version in
full, and A the rest of the old one, in both orders (A first, B first), and whether B opens at once (through the
dentry the kernel still has) or after the settle time. Every byte is compared with the version each opened. The
same for the other ways a name changes its file: removed from the store and downloaded again, moved from a shared
directory to the store, and a download finishing under streaming handles. Run with the daemon read path and with
passthrough where the machine has it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

MB = 1 << 20
SIZE = 3 * MB + 4096 + 17  # not a multiple of a page: the tail page matters too
SETTLE = 2.2  # past the store's and shared dirs' "recently changed" window and the kernel's entry cache

# A child holding one file of the mount by read or mmap: touches [0, FIRST) on start, says "ready", then on
# "rest" reads (or touches) everything else and prints the sha256 of all the bytes it saw and its fstat size.
_HOLD = r"""
import hashlib, mmap, os, sys
path, how, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
if how == "mmap":
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    head = bytes(mm[:first])
else:
    head = os.pread(fd, first, 0)
print("ready", flush=True)
sys.stdin.readline()
if how == "mmap":
    rest = bytes(mm[first:])
    head2 = bytes(mm[:first])  # the pages touched before the replacement, touched again
else:
    rest = os.pread(fd, size, first)
    head2 = os.pread(fd, first, 0)
ok = head2 == head
print(hashlib.sha256(head + rest).hexdigest(), os.fstat(fd).st_size, "same-head" if ok else "head-changed",
      flush=True)
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Holder:
    started: list[Holder] = []

    def __init__(self, path: Path, how: str, first: int = MB) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), how, str(first)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        Holder.started.append(self)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def rest(self) -> tuple[str, int, str]:
        """(sha256 of every byte this handle read, its fstat size, whether its first MiB read the same again)."""
        out, _ = self.proc.communicate("rest\n", timeout=30)
        digest, size, head = out.split()
        return digest, int(size), head


@pytest.fixture(autouse=True)
def no_holder_left(mount: object) -> Iterator[None]:
    """A test that fails midway leaves no reader behind (it would hold the mount and warn at exit)."""
    yield
    for holder in Holder.started:
        if holder.proc.poll() is None:
            holder.proc.kill()
        holder.proc.communicate(timeout=10)
    Holder.started.clear()


def assert_io(path: Path, io: str) -> None:
    """The handles open on `path` are served the way the test's I/O path says (no silent fallback)."""
    assert os.getxattr(path, "user.modelfs.io").decode() == io


def read_new(path: Path) -> bytes:
    """What a new opener gets, in a new process."""
    return subprocess.run(["cat", str(path)], capture_output=True, check=True, timeout=30).stdout


def replace(path: Path, data: bytes) -> None:
    """The usual way to update a model: write it aside, rename it over the old one."""
    tmp = path.with_name(".incoming")
    tmp.write_bytes(data)
    os.replace(tmp, path)


pytestmark = pytest.mark.io_paths


def mount_args(io: str, *more: str) -> tuple[str, ...]:
    """Each test mounts with the I/O path of its `io` parameter (conftest); say it in the command line too."""
    return ("--passthrough", "on" if io == "passthrough" else "off", *more)


@pytest.mark.parametrize("order", ["old-first", "new-first"])
@pytest.mark.parametrize("how", ["read", "mmap"])
@pytest.mark.parametrize("where", ["store", "shared"])
def test_a_handle_keeps_its_version_when_the_model_is_replaced(mount, dirs, io, where, how, order):
    root = dirs[where]
    old = {n: gguf_bytes(SIZE, seed=i + 1) for i, n in enumerate(("now", "later"))}
    new = {n: gguf_bytes(SIZE, seed=i + 11) for i, n in enumerate(("now", "later"))}
    paths = {n: write_model(root, n, data) for n, data in old.items()}
    m = mount(*mount_args(io, "--shared", str(dirs["shared"])))
    holders = {n: Holder(m.model(n), how) for n in old}
    for n in old:
        assert_io(m.model(n), io)
        replace(paths[n], new[n])

    def old_reader_checks(n: str) -> None:
        digest, size, head = holders[n].rest()
        assert (digest, size, head) == (sha(old[n]), SIZE, "same-head"), f"{n}: the old handle saw new bytes"

    if order == "old-first":
        for n in old:
            old_reader_checks(n)
    # At once: the kernel still has the name's dentry and its old inode; the new opener must not land there.
    assert read_new(m.model("now")) == new["now"]
    time.sleep(SETTLE)
    assert read_new(m.model("later")) == new["later"]
    if order == "new-first":
        for n in old:
            old_reader_checks(n)
    # And new openers keep seeing the new version, from one inode.
    assert read_new(m.model("now")) == new["now"] and read_new(m.model("later")) == new["later"]


def test_a_replacement_of_another_size_is_never_served_with_the_old_size(mount, dirs, io):
    path = write_model(dirs["store"], "grow", gguf_bytes(SIZE, seed=1))
    m = mount(*mount_args(io))
    held = Holder(m.model("grow"), "mmap")
    assert_io(m.model("grow"), io)
    bigger = gguf_bytes(SIZE + 5 * MB, seed=2)
    replace(path, bigger)
    assert read_new(m.model("grow")) == bigger  # at once, through the kernel's cached dentry
    assert os.stat(m.model("grow")).st_size == len(bigger)
    assert held.rest() == (sha(gguf_bytes(SIZE, seed=1)), SIZE, "same-head")


def test_gguf_reader_keeps_its_model_while_it_is_replaced(mount, dirs, io, tmp_path):
    gguf = pytest.importorskip("gguf")
    from tests.support.ggufmaker import make_gguf, tensors_match

    path = dirs["shared"] / "org" / "live" / "model.gguf"
    v1 = make_gguf(path, seed=1, tensor_elems=64 * 1024)
    v2 = make_gguf(tmp_path / "v2.gguf", seed=2, tensor_elems=64 * 1024)
    assert path.stat().st_size == (tmp_path / "v2.gguf").stat().st_size
    m = mount(*mount_args(io, "--shared", str(dirs["shared"])))
    reader = gguf.GGUFReader(m.model("org/live"))  # memory-mapped, as llama.cpp loads a model
    first = reader.tensors[0]
    assert (first.data == v1[first.name]).all()
    os.replace(tmp_path / "v2.gguf", path)
    assert tensors_match(m.model("org/live"), v2)  # a new reader gets the new model
    for tensor in reader.tensors:  # the running one keeps the old, every tensor
        assert (tensor.data == v1[tensor.name]).all(), tensor.name


@pytest.mark.parametrize("how", ["read", "mmap"])
def test_shared_model_superseded_by_the_store(mount, dirs, io, how):
    old, new = gguf_bytes(SIZE, seed=1), gguf_bytes(SIZE, seed=2)
    write_model(dirs["shared"], "moved", old)
    m = mount(*mount_args(io, "--shared", str(dirs["shared"])))
    held = Holder(m.model("moved"), how)
    assert_io(m.model("moved"), io)
    write_model(dirs["store"], "moved", new)  # the store comes first from now on
    time.sleep(SETTLE)
    assert read_new(m.model("moved")) == new
    assert os.getxattr(m.model("moved"), "user.modelfs.source") == b"local"
    assert held.rest() == (sha(old), SIZE, "same-head")


def test_model_removed_from_the_store_and_downloaded_again(mount, router, dirs, io):
    old, new = gguf_bytes(SIZE, seed=1), gguf_bytes(SIZE, seed=2)
    local = write_model(dirs["store"], "again", old)
    r = router()
    write_model(r.models_dir, "again", new)
    m = mount(*mount_args(io, "--router", r.url))
    held = Holder(m.model("again"), "mmap")
    assert_io(m.model("again"), io)
    local.unlink()  # evicted or removed by an admin while a reader has it mapped
    time.sleep(SETTLE)
    assert read_new(m.model("again")) == new  # downloaded again from the router
    wait_for(local.exists, what="the new download's promotion")
    assert read_new(m.model("again")) == new
    assert held.rest() == (sha(old), SIZE, "same-head")


def test_streaming_handles_and_later_opens_agree_when_a_download_finishes(mount, router, dirs, io):
    data = gguf_bytes(8 * MB + 3, seed=5)
    r = router()
    r.control(rate=4 * MB)  # slow enough that the first reader streams while the download runs
    write_model(r.models_dir, "stream", data)
    m = mount(*mount_args(io, "--router", r.url))
    held = Holder(m.model("stream"), "read")  # opened while downloading: the daemon streams it
    assert_io(m.model("stream"), "daemon")
    final = dirs["store"] / "stream" / "model.gguf"
    wait_for(final.exists, timeout=30, what="promotion into the store")
    assert read_new(m.model("stream")) == data  # opened after promotion, beside the streaming handle
    assert held.rest() == (sha(data), len(data), "same-head")
    assert read_new(m.model("stream")) == data  # and once every handle has closed
    with open(m.model("stream"), "rb"):
        assert_io(m.model("stream"), io)  # a complete file now: passthrough where the test asks for it
    assert r.blob_gets("stream") == 1


def test_old_versions_are_forgotten_once_closed(mount, dirs, io):
    """What the scheme costs: an inode per version only while a handle or the kernel still has it."""
    path = write_model(dirs["store"], "churn", b"GGUF0000")
    m = mount(*mount_args(io))
    held = []
    for i in range(1, 21):
        held.append(open(m.model("churn"), "rb"))  # noqa: SIM115 - closed below, all at once
        replace(path, b"GGUF%04d" % i)
        assert read_new(m.model("churn")) == b"GGUF%04d" % i
    assert [f.read() for f in held] == [b"GGUF%04d" % i for i in range(20)]

    def inodes() -> dict[str, int]:
        return json.loads(os.getxattr(m.path, "user.modelfs.status"))["inodes"]

    assert inodes()["versions"] == 21 and inodes()["handles"] == 20
    for f in held:
        f.close()
    wait_for(lambda: inodes() == {"directories": 1, "versions": 1, "open_files": 0, "handles": 0},
             what="old versions to be forgotten")


def test_a_download_whose_source_changes_midway_never_mixes_versions(mount, router, dirs, io):
    """llmlb sends no validator: a broken body is fetched again from byte 0, and if the router's file changed in
    between, the readers of the first bytes must not get the new ones. They get the old bytes already on disk,
    then EIO; a new open downloads the new version."""
    old, new = gguf_bytes(6 * MB, seed=1), gguf_bytes(6 * MB, seed=2)
    r = router()
    path = write_model(r.models_dir, "moving", old)
    r.control(truncate_after=3 * MB, truncate_times=1, rate=6 * MB)
    m = mount(*mount_args(io, "--router", r.url, "--retries", "2"))
    m.expected_errors.append("changed on the server during the download")
    with open(m.model("moving"), "rb") as f:
        head = f.read(MB)
        assert head == old[:MB]
        replace(path, new)  # the body in flight keeps sending the old file; the retry gets the new one
        got = bytearray(head)
        with pytest.raises(OSError) as failure:
            while chunk := f.read(MB):
                got += chunk
        assert failure.value.errno == errno.EIO
    assert bytes(got) == old[:len(got)]  # only old bytes, then an error
    assert "changed on the server during the download" in m.log_text()
    assert read_new(m.model("moving")) == new, m.log_text()
    wait_for((dirs["store"] / "moving" / "model.gguf").exists, what="the new version's promotion")
    assert (dirs["store"] / "moving" / "model.gguf").read_bytes() == new


def test_a_model_downloaded_again_in_one_mount_is_the_new_version(mount, router, dirs, io):
    """The second download's partial file may get the first one's recycled inode number, with the same size: its
    own mtime (each download's start) keeps its identity apart, so no page of the first reaches a new opener."""
    old, new = gguf_bytes(SIZE, seed=1), gguf_bytes(SIZE, seed=2)
    r = router()
    path = write_model(r.models_dir, "twice", old)
    m = mount(*mount_args(io, "--router", r.url))
    final = dirs["store"] / "twice" / "model.gguf"
    assert read_new(m.model("twice")) == old
    wait_for(final.exists, what="the first promotion")
    assert read_new(m.model("twice")) == old  # from the store, its pages cached
    final.unlink()
    (final.parent / ".modelfs-downloaded").unlink()
    replace(path, new)
    time.sleep(SETTLE)
    assert read_new(m.model("twice")) == new
    wait_for(final.exists, what="the second promotion")
    assert read_new(m.model("twice")) == new
    assert r.blob_gets("twice") == 2


# Opens, reads the whole file and closes, in a loop until a deadline; prints how many opens it made and every
# error it got, and whether every read saw one of the versions it was given (sha256 of each allowed version).
_STORM = r"""
import hashlib, os, sys, time
deadline, allowed, paths = float(sys.argv[1]), set(sys.argv[2].split(",")), sys.argv[3:]
opens, errors, wrong = 0, [], 0
while time.time() < deadline:
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            errors.append(f"{os.path.basename(path)}: {exc.strerror}")
            continue
        opens += 1
        wrong += hashlib.sha256(data).hexdigest() not in allowed
print(opens, wrong, "|".join(errors), flush=True)
"""


def test_many_processes_opening_a_just_changed_shared_file_never_see_an_error(mount, dirs, io):
    """A shared file changed in the last 2 s: its identity proves nothing, so opens must not share its inode with
    handles already open, and yet no open may fail (the kernel retries an ESTALE once, never twice)."""
    count = 12
    versions = [gguf_bytes(256 * 1024, seed=s) for s in (1, 2)]
    paths = [write_model(dirs["shared"], f"fresh/m{i}", versions[0]) for i in range(count)]
    m = mount(*mount_args(io, "--shared", str(dirs["shared"])))
    for path in paths:
        replace(path, versions[1])  # every file changed just now: racily clean for the next 2 s
    deadline = time.time() + 1.8
    allowed = ",".join(sha(v) for v in versions)
    procs = [subprocess.Popen([sys.executable, "-c", _STORM, str(deadline), allowed,
                               *(str(m.model(f"fresh/m{i}")) for i in range(count))],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=60)[0].split(" ", 2) for p in procs]
    opens = sum(int(r[0]) for r in results)
    errors = [e for r in results for e in r[2].strip().split("|") if e]
    assert opens > 6 * count, "the storm made too few opens to mean anything"
    assert sum(int(r[1]) for r in results) == 0, "an open read bytes of no single version"
    assert errors == [], f"{len(errors)} of {opens + len(errors)} opens failed: {errors[:5]}"
