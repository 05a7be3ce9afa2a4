"""The patched pyfuse3's resume API (patches/pyfuse3/0004-resume.patch), without modelfs: a tiny filesystem whose
reads are slow is killed mid-read; a second process resumes the live connection from the recorded FUSE_INIT and
asks the kernel to resend, and the reader gets every byte right. Also what the API refuses.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest

from tests.support.mount import fuse_missing
from tests.support.procs import wait_for
from tests.support.sshfs import is_mounted

SIZE = 8 << 20

# One file, 'f', of SIZE bytes (byte i is i % 251), read in 64 KiB requests that wait 10 ms each: one is nearly
# always in progress.
# "fresh" mounts and sends the test (socket fd argv[3]) the /dev/fuse descriptor with the FUSE_INIT record;
# "resume" serves the descriptor argv[4] with the record in argv[5:7] and says "ready".
_SERVER = r"""
import array, errno, os, socket, stat, struct, sys
import pyfuse3, trio
mode, mountpoint, sock = sys.argv[1], sys.argv[2], socket.socket(fileno=int(sys.argv[3]))
SIZE = 8 << 20
DATA = (bytes(range(251)) * (SIZE // 251 + 1))[:SIZE]
class FS(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes(); a.st_ino = inode; a.attr_timeout = a.entry_timeout = 60
        a.st_mode = stat.S_IFDIR | 0o555 if inode == 1 else stat.S_IFREG | 0o444
        a.st_size = 0 if inode == 1 else SIZE
        a.st_blksize = 65536
        return a
    async def lookup(self, parent, name, ctx):
        if name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(2)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=1, direct_io=True)
    async def read(self, fh, off, size):
        await trio.sleep(0.01)
        return DATA[off:off + size]
async def main():
    async with trio.open_nursery() as nursery:
        if mode == "fresh":
            async def announce():
                await trio.to_thread.run_sync(os.stat, mountpoint)
                request, reply = pyfuse3.init_record()
                sock.sendmsg([struct.pack("II", len(request), len(reply)) + request + reply],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pyfuse3.session_fd()]))])
            nursery.start_soon(announce)
        else:
            sock.send(b"ready")
        await pyfuse3.main()
if mode == "fresh":
    pyfuse3.init(FS(), mountpoint, {"fsname=resume-test", "ro"})
else:
    pyfuse3.resume(FS(), int(sys.argv[4]), bytes.fromhex(sys.argv[5]), bytes.fromhex(sys.argv[6]))
    os.write(int(sys.argv[4]), struct.pack("<IiQ", 16, 7, 0))  # FUSE_NOTIFY_RESEND
trio.run(main)
pyfuse3.close(unmount=False)
"""


@pytest.fixture
def mountpoint(tmp_path):
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if is_mounted(str(path)):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def test_a_second_process_resumes_the_live_connection(mountpoint):
    ours, theirs = socket.socketpair()
    first = subprocess.Popen([sys.executable, "-c", _SERVER, "fresh", str(mountpoint), str(theirs.fileno())],
                             pass_fds=[theirs.fileno()])
    second = None
    try:
        message, ancillary, _, _ = ours.recvmsg(4096, socket.CMSG_SPACE(4))
        fuse = array.array("i", ancillary[0][2][:4])[0]
        lengths = struct.unpack("II", message[:8])
        request, reply = message[8:8 + lengths[0]], message[8 + lengths[0]:8 + sum(lengths)]
        assert struct.unpack_from("<I", request, 4)[0] == 26  # the kernel's FUSE_INIT, as read
        reader = subprocess.Popen(["cmp", str(mountpoint / "f"), "/dev/stdin"], stdin=subprocess.PIPE)
        time.sleep(0.5)
        assert reader.poll() is None  # mid-file, a read in progress in the first process
        first.kill()
        first.wait()
        second = subprocess.Popen([sys.executable, "-c", _SERVER, "resume", str(mountpoint), str(theirs.fileno()),
                                   str(fuse), request.hex(), reply.hex()], pass_fds=[theirs.fileno(), fuse])
        assert ours.recv(16) == b"ready"
        assert reader.communicate((bytes(range(251)) * (SIZE // 251 + 1))[:SIZE], timeout=60)[0] is None
        assert reader.returncode == 0  # every byte, the one read in progress included
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        ours.close()
        theirs.close()


class Ops(pyfuse3.Operations):
    def init(self) -> None:
        pass


def recorded_init(mountpoint: Path) -> tuple[bytes, bytes]:
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, "fresh", str(mountpoint), str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
    try:
        message, ancillary, _, _ = ours.recvmsg(4096, socket.CMSG_SPACE(4))
        os.close(array.array("i", ancillary[0][2][:4])[0])
        lengths = struct.unpack("II", message[:8])
        return message[8:8 + lengths[0]], message[8 + lengths[0]:8 + sum(lengths)]
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        server.wait(timeout=10)
        ours.close()
        theirs.close()


def test_replay_and_resume_refuse_another_negotiation(mountpoint):
    request, reply = recorded_init(mountpoint)
    assert pyfuse3.replay_init(Ops(), request) == reply  # the same library and operations: the same answer
    other = Ops()
    other.max_background = 64  # type: ignore[attr-defined]
    different = pyfuse3.replay_init(other, request)
    assert different != reply and "max_background 0x40" in pyfuse3.init_difference(reply, different)
    fd = os.open(os.devnull, os.O_RDWR)
    with pytest.raises(RuntimeError, match="FUSE_INIT would be answered differently: max_background"):
        pyfuse3.resume(other, fd, request, reply)
    with pytest.raises(ValueError, match="not a FUSE_INIT request"):
        pyfuse3.replay_init(Ops(), reply)
    wait_for(lambda: not is_mounted(str(mountpoint)), what="the unmount")


def test_what_fusedev_reads_of_a_fuse_init_request():
    """Pure: whether the kernel that sent a FUSE_INIT can resend (FUSE_HAS_RESEND is flags2 bit 7, protocol 7.40),
    which decides between leaving requests to the next daemon and draining them first."""
    from modelfs import fusedev

    def init(minor: int, flags2: int) -> bytes:
        header = fusedev.IN_HEADER.pack(104, fusedev.FUSE_INIT, 2, 0, 0, 0, 0, 0, 0)
        return header + fusedev.INIT_IN.pack(7, minor, 1 << 20, 1 << 30, flags2) + bytes(44)

    assert fusedev.kernel_resends(init(45, fusedev.HAS_RESEND | 1))
    assert not fusedev.kernel_resends(init(45, 1))  # a kernel that does not say it can
    assert not fusedev.kernel_resends(init(39, fusedev.HAS_RESEND))  # before 7.40 the bit meant nothing
    assert not fusedev.kernel_resends(init(45, fusedev.HAS_RESEND)[:50])
    assert fusedev.ATTR_OUT.size == 104  # struct fuse_attr_out, what the failed supervisor answers for the root
