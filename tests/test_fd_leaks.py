"""No file descriptor leaks: the daemon's open descriptors (/proc/PID/fd) return to their baseline after storms of
opens, reads and closes by many processes, with the failures that leave descriptors behind when code forgets them:
a shared directory stopped mid-open (sshfs SIGSTOP: opens given up while their thread still runs), files vanishing
between lookup and open, and opens of replaced files that the kernel retries after ESTALE."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for
from tests.support.sshfs import Sshd, SshfsMount, sshfs_available

_REASON = sshfs_available()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.io_paths]

# Runs in a child: for argv[1] seconds, opens each path in turn, reads a page at its start and middle (unless
# argv[2] is "open-only"), closes it; prints how many opens and failures it saw.
_STORM = r"""
import json, os, sys, time
end = time.monotonic() + float(sys.argv[1])
read = sys.argv[2] == "read"
opens = errors = 0
seen = {}
while time.monotonic() < end:
    for path in sys.argv[3:]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            errors += 1
            seen[exc.errno] = seen.get(exc.errno, 0) + 1
            time.sleep(0.001)
            continue
        opens += 1
        try:
            size = os.fstat(fd).st_size
            if read:
                os.pread(fd, 4096, 0)
                os.pread(fd, 4096, size // 2)
        except OSError as exc:
            errors += 1
            seen[exc.errno] = seen.get(exc.errno, 0) + 1
        finally:
            os.close(fd)
print(json.dumps({"opens": opens, "errors": errors, "errnos": seen}))
"""


def storm(paths: list[Path], seconds: float, children: int = 4, read: bool = True) -> list[subprocess.Popen[str]]:
    """`children` processes opening (and reading) `paths` for `seconds`, each in another order."""
    return [subprocess.Popen([sys.executable, "-c", _STORM, str(seconds), "read" if read else "open-only",
                              *map(str, paths[i % len(paths):] + paths[:i % len(paths)])],
                             stdout=subprocess.PIPE, text=True) for i in range(children)]


def finish(procs: list[subprocess.Popen[str]], timeout: float = 60) -> dict[str, Any]:
    total: dict[str, Any] = {"opens": 0, "errors": 0, "errnos": {}}
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0
        result = json.loads(out)
        total["opens"] += result["opens"]
        total["errors"] += result["errors"]
        for err, count in result["errnos"].items():
            total["errnos"][errno.errorcode[int(err)]] = total["errnos"].get(errno.errorcode[int(err)], 0) + count
    return total


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    with Sshd() as server:
        yield server


def descriptors(pid: int) -> dict[str, str]:
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return found


def test_descriptors_return_to_baseline_after_storms_with_failures(mount, dirs, sshd, tmp_path):
    server = tmp_path / "remote"
    server.mkdir()
    local = [write_model(dirs["store"], f"l{i}", gguf_bytes(64 << 10, seed=i + 1)) for i in range(6)]
    shared = [write_model(server, f"s{i}", gguf_bytes(64 << 10, seed=i + 11)) for i in range(12)]
    settled = time.time() - 60  # sshfs files changed in the last 2 s get a fresh inode per open (not this test's)
    for path in shared:
        os.utime(path, (settled, settled))
    with SshfsMount(sshd, str(server), str(dirs["shared"]), direct_io=False) as sshfs:
        # --no-supervisor: the process started is the daemon whose descriptors are counted.
        m = mount("--no-supervisor", "--shared", str(dirs["shared"]), "--shared-timeout", "0.5", "--debug")
        pid = m.proc.pid
        models = [m.model(f"l{i}") for i in range(len(local))] + [m.model(f"s{i}") for i in range(len(shared))]
        finish(storm(models, 1.0))  # warm up: threads, caches
        baseline = descriptors(pid)

        # 1. A plain storm.
        plain = finish(storm(models, 2.0))
        assert plain["errors"] == 0 and plain["opens"] > 100, (plain, m.log_text()[-5000:])

        # 2. The share stops answering while opens are in flight, long enough for them to be given up.
        procs = storm([m.model(f"s{i}") for i in range(len(shared))], 4.0, children=8, read=False)
        time.sleep(0.5)
        sshfs.stop()
        time.sleep(2.0)
        sshfs.cont()
        stopped = finish(procs)
        assert "unavailable" in m.log_text(), m.log_text()[-3000:]

        # 3. Files vanishing and replaced under open storms: store and shared files renamed away and back, and
        # replaced by files of another size while the kernel still has their old inode (its opens get ESTALE).
        procs = storm(models, 4.0)
        end = time.monotonic() + 3.5
        flip = 0
        while time.monotonic() < end:
            flip += 1
            for path in (*local[:3], *shared[:6]):
                gone = path.with_name("gone")
                os.rename(path, gone)
                time.sleep(0.002)
                os.rename(gone, path)
            target = local[3 + flip % 3]
            os.stat(m.model(target.parent.name))  # the kernel learns the current inode
            tmp = target.with_name("tmp")
            tmp.write_bytes(gguf_bytes((64 << 10) + flip, seed=flip))  # another size: the old inode cannot serve it
            os.replace(tmp, target)
            with open(m.model(target.parent.name), "rb") as f:
                f.read(4096)
        churn = finish(procs)
        log = m.log_text()
        assert "is an older version of the file" in log  # ESTALE was answered, and the kernel retried

        wait_for(lambda: json.loads(os.getxattr(m.path, "user.modelfs.shared"))[0]["available"], 10,
                 "the share back")
        try:
            wait_for(lambda: len(descriptors(pid)) <= len(baseline), 15, "the descriptors back to their baseline")
        except AssertionError:
            extra = {fd: target for fd, target in descriptors(pid).items() if baseline.get(fd) != target}
            raise AssertionError(f"{len(extra)} descriptors left open: {sorted(extra.values())[:20]}") from None
        print(f"\ndescriptors: baseline {len(baseline)}; opens {plain['opens']} plain, {stopped['opens']} "
              f"with the share stopped ({stopped['errors']} failed), {churn['opens']} with files churning "
              f"({churn['errors']} failed); after: {len(descriptors(pid))}")
