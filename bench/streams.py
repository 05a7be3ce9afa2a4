"""Threads or one thread with several connections, for ranged parts (the question behind download_streams).

    .venv/bin/python bench/streams.py URL SIZE_BYTES OUT_FILE [--streams 1,4,8]

Fetches [0, SIZE) of URL in 8 MiB ranged parts into OUT_FILE (pwrite) with N blocking threads (what modelfs
does: httpx.Client + router.iter_body) and with N trio tasks in one thread (httpx.AsyncClient), and prints MB/s
and CPU seconds per GiB of this process for each. No mount: only the HTTP + write side is compared.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelfs import router  # noqa: E402
from modelfs.router import iter_body  # noqa: E402  (also sets httpcore's 1 MiB socket reads)

PART = 8 << 20


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parts(size: int) -> list[tuple[int, int]]:
    return [(start, min(start + PART, size)) for start in range(0, size, PART)]


def threads(url: str, size: int, fd: int, streams: int) -> None:
    queue = parts(size)
    lock = threading.Lock()
    client = httpx.Client(timeout=30)

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                start, end = queue.pop(0)
            with client.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}) as response:
                position = start
                for chunk in iter_body(response):
                    position += os.pwrite(fd, chunk, position)

    workers = [threading.Thread(target=work) for _ in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    client.close()


def one_thread(url: str, size: int, fd: int, streams: int) -> None:
    async def main() -> None:
        queue = parts(size)
        async with httpx.AsyncClient(timeout=30) as client:
            async def work() -> None:
                while queue:
                    start, end = queue.pop(0)
                    headers = {"Range": f"bytes={start}-{end - 1}"}
                    async with client.stream("GET", url, headers=headers) as response:
                        position = start
                        async for chunk in response.aiter_raw():
                            position += os.pwrite(fd, chunk, position)

            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(work)

    trio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("size", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--no-lowat", action="store_true", help="leave SO_RCVLOWAT at 1 (modelfs before the fix)")
    parser.add_argument("--threads-only", action="store_true")
    args = parser.parse_args()
    if args.no_lowat:
        router.BODY_LOWAT = 1
    for streams in [int(n) for n in args.streams.split(",")]:
        for name, run in (("threads", threads), ("one thread", one_thread))[: 1 if args.threads_only else 2]:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            began, used = time.perf_counter(), cpu()
            run(args.url, args.size, fd, streams)
            seconds = time.perf_counter() - began  # as curl -o is timed: written, not yet synced
            used = cpu() - used
            os.fsync(fd)
            os.close(fd)
            where = f"{args.url.split('/')[2]} {'no lowat' if args.no_lowat else 'lowat':8}"
            print(f"{where} {streams} streams, {name:10}: {args.size / seconds / 1e6:6.0f} MB/s, "
                  f"CPU {used * (1 << 30) / args.size:.2f} s/GiB", flush=True)
            args.out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
