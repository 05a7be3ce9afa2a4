"""The patched pyfuse3 (scripts/build-fuse) does FUSE passthrough and asks for parallel dirops.

A tiny pyfuse3 filesystem, in a subprocess, serves one file whose opens are passed through to a backing file:
it registers the backing file with FUSE_DEV_IOC_BACKING_OPEN on `pyfuse3.session_fd()` and returns
`FileInfo(fh=..., backing_id=...)`. `cat` and an mmap then read the right bytes while the daemon's `read` is never
called, so the kernel served them from the backing file; libfuse's debug log shows FUSE_PARALLEL_DIROPS in the
INIT reply. This tests the library chain only, not modelfs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.mount import fuse_missing
from tests.support.sshfs import is_mounted

FS = r'''
import errno, fcntl, json, os, stat, struct, sys
import pyfuse3, trio

BACKING_OPEN = 0x4010E501   # _IOW(229, 1, struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding})
BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32)
mountpoint, backing = sys.argv[1], sys.argv[2]
NAME, INO = b"data.bin", 2
state = {"opens": 0, "reads": 0, "backing_ids": [], "passthrough": None, "parallel_dirops": None}


class Fs(pyfuse3.Operations):
    enable_passthrough = True

    def attrs(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o555, 0
        else:
            a.st_mode, a.st_size = stat.S_IFREG | 0o444, os.stat(backing).st_size
        a.attr_timeout = a.entry_timeout = 1
        return a

    async def getattr(self, ino, ctx=None):
        return self.attrs(ino)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(INO)

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, start, token):
        if start == 0:
            pyfuse3.readdir_reply(token, NAME, self.attrs(INO), 1)

    async def open(self, ino, flags, ctx):
        state["passthrough"] = pyfuse3.passthrough_granted()
        state["parallel_dirops"] = pyfuse3.parallel_dirops_granted()
        fd = os.open(backing, os.O_RDONLY)
        arg = bytearray(struct.pack("=iIQ", fd, 0, 0))
        backing_id = fcntl.ioctl(pyfuse3.session_fd(), BACKING_OPEN, arg, True)
        state["opens"] += 1
        state["backing_ids"].append(backing_id)
        ids[fd] = backing_id
        return pyfuse3.FileInfo(fh=fd, backing_id=backing_id)

    async def read(self, fh, off, size):
        state["reads"] += 1          # never, if the kernel passes reads through
        return os.pread(fh, size, off)

    async def release(self, fh):
        fcntl.ioctl(pyfuse3.session_fd(), BACKING_CLOSE, struct.pack("=I", ids.pop(fh)))
        os.close(fh)


ids = {}
pyfuse3.init(Fs(), mountpoint, set(pyfuse3.default_options) | {"fsname=passthrough-test", "debug"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
print(json.dumps(state), flush=True)
'''


def kernel_has_passthrough() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 9)


def test_passthrough_cat_and_mmap(tmp_path: Path) -> None:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    if not kernel_has_passthrough():
        pytest.skip("FUSE passthrough needs Linux >= 6.9")
    data = os.urandom(3 * 1024 * 1024 + 123)
    backing = tmp_path / "backing.bin"
    backing.write_bytes(data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "fs.py"
    script.write_text(FS)
    proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(backing)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not is_mounted(str(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"test filesystem did not mount: {proc.communicate()[1].decode()}")
            time.sleep(0.02)
        path = mnt / "data.bin"
        catted = subprocess.run(["cat", str(path)], capture_output=True, timeout=10)
        assert catted.returncode == 0, catted.stderr.decode()
        assert hashlib.sha256(catted.stdout).digest() == hashlib.sha256(data).digest()
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert len(m) == len(data)
            assert m[:4096] == data[:4096] and m[-4096:] == data[-4096:]
            assert hashlib.sha256(m).digest() == hashlib.sha256(data).digest()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=10)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    state = json.loads(out.decode().strip().splitlines()[-1])
    assert state["passthrough"] is True
    assert state["parallel_dirops"] is True
    assert state["opens"] == 2 and all(i > 0 for i in state["backing_ids"]), state
    assert state["reads"] == 0, "reads reached the daemon: not passed through"
    # libfuse's debug log of its INIT reply: the flags the kernel was sent (FUSE_PARALLEL_DIROPS is bit 18).
    reply = err.decode(errors="replace").split("   INIT: ", 1)[1]
    flags = int(reply.split("   flags=", 1)[1].split()[0], 16)
    assert flags & (1 << 18), f"INIT reply flags {flags:#x} lack FUSE_PARALLEL_DIROPS"
