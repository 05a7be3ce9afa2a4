"""Work the bench runs in a fresh child process, timed from inside (interpreter start-up excluded).

`python -m bench.probe TASK ARGS...` (from the repository root) prints one JSON object:
  mmap-touch PATH [byte]     mmap the file and touch every page (or read every byte) → {"seconds"}
  gguf-load PATH             gguf.GGUFReader (mmap) + touch every page of every tensor → {"seconds", "tensors"}
  stat-missing DIR N PREFIX  stat DIR/PREFIX<i>.gguf for i < N, each once (expect ENOENT) → {"ms": [...]}
  read-cache FILE BACKING    read FILE to the end and close it; bytes of FILE and BACKING in the page cache, and
                             FILE's user.modelfs.io
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import MIB, PAGE, cached_bytes, cached_bytes_fd


def mmap_touch(path: str, every: str = "page") -> dict[str, float]:
    """Touch one byte of every page, or with every=byte read every byte (sum as uint64 words)."""
    import numpy as np

    start = time.perf_counter()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint8)
        if every == "byte":
            whole = len(data) // 8 * 8
            total = int(data[:whole].view(np.uint64).sum(dtype=np.uint64)) + int(data[whole:].sum())
        else:
            total = int(data[::PAGE].sum(dtype=np.uint64))
        del data  # no exported buffer may outlive the mapping
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "checksum": total}


def gguf_load(path: str) -> dict[str, float]:
    import gguf
    import numpy as np

    start = time.perf_counter()
    reader = gguf.GGUFReader(path)
    total = 0
    for tensor in reader.tensors:
        data = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        total += int(data[::PAGE].sum(dtype=np.uint64)) + int(data[-1])
    return {"seconds": time.perf_counter() - start, "tensors": len(reader.tensors), "checksum": total}


def stat_missing(directory: str, count: str, prefix: str) -> dict[str, list[float]]:
    times = []
    for i in range(int(count)):
        path = os.path.join(directory, f"{prefix}{i}.gguf")
        start = time.perf_counter()
        try:
            os.stat(path)
        except FileNotFoundError:
            pass
        else:
            raise SystemExit(f"{path} exists")
        times.append((time.perf_counter() - start) * 1000)
    return {"ms": times}


def read_cache(path: str, backing: str) -> dict[str, int | str]:
    """Read `path` to the end with one open file, close it, then count cached bytes of `path` and `backing`.

    The FUSE file's pages are counted through a second open file held from the start, so no open after the
    read can renew (drop) the mount's cache, and the daemon sees the reader's close (release) as a real one.
    """
    holder = os.open(path, os.O_RDONLY)
    try:
        fd = os.open(path, os.O_RDONLY)
        size = 0
        while chunk := os.read(fd, MIB):
            size += len(chunk)
        io = os.getxattr(path, "user.modelfs.io").decode()  # with passthrough, the mapping is the backing file's
        while_open = {"mount_open": cached_bytes_fd(fd), "backing_open": cached_bytes(Path(backing))}
        os.close(fd)
        time.sleep(0.5)  # the release reaches the daemon asynchronously
        return {"size": size, **while_open, "mount": cached_bytes_fd(holder), "backing": cached_bytes(Path(backing)),
                "io": io}
    finally:
        os.close(holder)


TASKS: dict[str, Callable[..., object]] = {
    "mmap-touch": mmap_touch, "gguf-load": gguf_load, "stat-missing": stat_missing, "read-cache": read_cache,
}

if __name__ == "__main__":
    print(json.dumps(TASKS[sys.argv[1]](*sys.argv[2:])))
