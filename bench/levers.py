"""Run `modelfs` with experimental changes patched in at start-up, to measure what each would gain or cost.

`python bench/levers.py mount ...` is `python -m modelfs mount ...` with the patches named in BENCH_MODELFS_LEVERS
(comma-separated) applied by monkeypatching; modelfs/ itself is never changed. These are measurements, not code
to copy: the patches skip details a real change would need (keep_cache is set even when a file may have changed).
A patch that no longer fits the code fails the mount with a clear message, and the bench reports the lever n/a.

  keep_cache     every open answers keep_cache=True (the kernel keeps the FUSE page cache across opens)
  thread         local reads do `pread` in a worker thread (trio.to_thread) instead of inline on the loop
  inline_shared  shared-directory reads do `pread` inline on the loop (no thread hop, no timeout)
  httpx64k       httpcore reads the router's body 64 KiB per recv (its default) instead of what modelfs sets
  no_lowat       blob sockets keep SO_RCVLOWAT at 1: the download thread wakes on every arrival (nginx: ~96 KiB)
  ra_fix         modelfs's own read-ahead setting is written once the kernel has the daemon's FUSE_INIT answer
                 (the kernel lowers read-ahead to what INIT negotiated, so a value written before is lost)

Knobs modelfs has as settings (read-ahead, dropping backing pages) are set by the bench through sysfs or
MODELFS_* variables instead. BENCH_MODELFS_TRACE=FILE writes a histogram of FUSE read sizes to FILE at exit.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
import threading
from typing import Any

import trio

from modelfs import cli, fs, readers


class LeverMismatch(Exception):
    """The code no longer has what a patch replaces."""


def _need(obj: object, *names: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise LeverMismatch(f"{getattr(obj, '__name__', obj)} has no {', '.join(missing)}")


def _keep_cache() -> None:
    _need(fs.ModelFS, "open")
    original = fs.ModelFS.open

    async def open_keeping_cache(self: fs.ModelFS, inode: int, flags: int, ctx: Any) -> Any:
        info = await original(self, inode, flags, ctx)
        info.keep_cache = True
        return info

    fs.ModelFS.open = open_keeping_cache  # type: ignore[method-assign]


def _thread() -> None:
    _need(readers.LocalReader, "read")

    async def local_read(self: readers.LocalReader, offset: int, size: int) -> Any:
        data = await trio.to_thread.run_sync(os.pread, self.fd, size, offset)
        cache = getattr(self, "cache", None)  # modelfs may drop backing pages behind readers
        if cache is not None:
            cache.served(offset, offset + len(data))
        return data

    readers.LocalReader.read = local_read  # type: ignore[method-assign]


def _inline_shared() -> None:
    _need(readers.SharedReader, "read")

    async def shared_read(self: readers.SharedReader, offset: int, size: int) -> Any:
        pread = getattr(self, "_pread", None)
        if pread is not None:
            return pread(size, offset)
        return os.pread(self.fd, size, offset)

    readers.SharedReader.read = shared_read  # type: ignore[method-assign]


def _httpx64k() -> None:
    import httpcore

    from modelfs import router  # noqa: F401  (it may set its own read size on import: override after)

    httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES = 64 * 1024
    httpcore._async.http11.AsyncHTTP11Connection.READ_NUM_BYTES = 64 * 1024


def _no_lowat() -> None:
    from modelfs import router

    _need(router, "BODY_LOWAT")
    router.BODY_LOWAT = 1


def _ra_fix() -> None:
    from modelfs import mount

    _need(mount, "set_read_ahead")
    original = mount.set_read_ahead

    def deferred(mountpoint: Any, kb: int) -> None:
        def later() -> None:
            os.stat(mountpoint)  # answered only once the loop serves requests, i.e. after FUSE_INIT
            original(mountpoint, kb)

        threading.Thread(target=later, daemon=True).start()

    mount.set_read_ahead = deferred


def _trace(path: str) -> None:
    sizes: collections.Counter[int] = collections.Counter()
    original = fs.ModelFS.read

    async def traced_read(self: fs.ModelFS, fh: int, off: int, size: int) -> Any:
        sizes[size] += 1
        return await original(self, fh, off, size)

    fs.ModelFS.read = traced_read  # type: ignore[method-assign]
    atexit.register(lambda: open(path, "w").write(json.dumps({str(k): v for k, v in sorted(sizes.items())})))


LEVERS = {"keep_cache": _keep_cache, "thread": _thread, "inline_shared": _inline_shared, "httpx64k": _httpx64k,
          "ra_fix": _ra_fix, "no_lowat": _no_lowat}


def main() -> int:
    for name in filter(None, os.environ.get("BENCH_MODELFS_LEVERS", "").split(",")):
        try:
            LEVERS[name]()
        except (KeyError, LeverMismatch) as exc:
            print(f"bench lever {name} does not apply: {exc}", file=sys.stderr)
            return 3
    if os.environ.get("BENCH_MODELFS_TRACE"):
        _trace(os.environ["BENCH_MODELFS_TRACE"])
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
