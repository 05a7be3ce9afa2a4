"""modelfs benchmark: every case compares modelfs with the direct path in the same run and prints one table.

    .venv/bin/python -m bench.run --size 1G [--size 8G] [--quick] [--cases warm,first,...] [--profile] [--check]

From the repository root. It creates its own GGUF files, router (the test router, or nginx with --server nginx),
sshd + sshfs and modelfs mounts (all from tests.support) in a work directory on the disk of the repository
(removed at the end), runs each case as interleaved A/B repetitions (median reported) and never leaves a mount or
a process behind, also when stopped by SIGINT or SIGTERM. Root only (page cache control, FUSE, sshd). --check
fails the run unless its table has every row of every case run, each with its figure. See bench/README.md.
"""

# This module is the command line, the case table (CASES, and ROWS: the rows each case prints) and the output
# (the docstring above is --help); the cases are in bench/local_cases.py, shared_cases.py and download_cases.py,
# on bench/core.py.

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.core import SMALL, Bench
from bench.download_cases import case_fetch, case_load, case_nginx, case_readers, case_rss
from bench.harness import MIB, ROOT, Janitor, Nginx, make_gguf_of_size, profile_summary, rmtree, start_router
from bench.local_cases import case_first, case_localload, case_mmap, case_pagecache, case_stat, case_warm
from bench.report import chart, check, download_chart, machine, table
from bench.shared_cases import case_hung, case_sshfs

CASES = ("warm", "first", "sshfs", "fetch", "nginx", "load", "localload", "readers", "mmap", "stat", "rss",
         "pagecache", "hung")
#: The rows each case prints, by a distinctive part of their label. --check requires each of them, each with its
#: figure: a ratio to the direct path, or, for a row whose target is an absolute figure, that figure measured
#: against it. A case that prints a row not listed here fails the check too: a new row is declared here.
ROWS = {
    "warm": ("warm read",),
    "first": ("first read via fresh mount", "daemon CPU per GiB read", "daemon path: first read",
              "daemon path: daemon CPU"),
    "sshfs": ("sshfs, default I/O", "sshfs -o direct_io"),
    "fetch": ("open → last byte",),
    "nginx": ("cold fetch from nginx", "nginx 25 MB/s per connection (streams", "first MiB at offset 0"),
    "load": ("cold load",),
    "localload": ("local model: GGUFReader + all tensors (backing dropped", "local model: GGUFReader + all tensors "
                  "(backing cached", "daemon path: load of a local model from disk"),
    "readers": ("concurrent cold readers: wall", "concurrent cold readers: router bytes sent"),
    "mmap": ("mmap + touch every page: first", "mmap + touch every page: warm", "mmap read of every byte"),
    "stat": ("stat of a missing name",),
    "rss": ("daemon peak RSS",),
    "pagecache": ("page cache after a full read",),
    "hung": ("beside a stalled router HEAD", "beside a hung shared dir"),
}


# Setup, machine description, output.


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def run_size(args: argparse.Namespace, size: int, cases: list[str], janitor: Janitor, work: Path,
             code: Path) -> Bench:
    b = Bench(size=size, reps=args.reps, readers=args.readers, missing=args.missing, work=work, janitor=janitor,
              server=args.server, profile=args.profile, code=code)
    for old in work.parent.glob("profile-*.txt"):
        old.unlink()  # profiles are kept after the run (bench/out/), but never mixed with older ones
    start = time.monotonic()
    make_gguf_of_size(b.local, size)
    b.remote.parent.mkdir(parents=True)
    shutil.copyfile(b.local, b.remote)
    b.size = os.stat(b.local).st_size
    small = b.work / "store" / SMALL / "model.gguf"
    make_gguf_of_size(small, MIB)
    hour_ago = time.time() - 3600
    for path in (b.local, b.remote, small):  # like a real model: not just written (modelfs trusts only settled files)
        os.utime(path, (hour_ago, hour_ago))
    print(f"made two GGUF files of {b.size} bytes in {time.monotonic() - start:.1f}s", flush=True)
    if args.server == "nginx":
        nginx = Nginx(janitor, work / "origin", work / "nginx")
        b.url, b.counter, b.sent = nginx.url, nginx.reset, nginx.bytes_sent
    else:
        router = start_router(janitor, work / "origin")
        b.url, b.counter, b.sent, b.router = router.url, router.reset, router.bytes_sent, router
    functions: dict[str, Callable[[Bench], None]] = {
        "warm": case_warm, "first": case_first, "sshfs": case_sshfs, "fetch": case_fetch, "nginx": case_nginx,
        "load": case_load,
        "readers": case_readers, "mmap": case_mmap, "stat": case_stat, "rss": case_rss,
        "pagecache": case_pagecache, "localload": case_localload, "hung": case_hung,
    }
    for case in cases:
        print(f"[{size / MIB:.0f} MiB] {case}", flush=True)
        before = len(b.rows)
        functions[case](b)
        b.case_rows[case] = b.rows[before:]
    b.raw.append(f"read_ahead_kb of the mounts as modelfs set it: {sorted(b.read_ahead)}")
    if args.profile:
        for spy in b.profiles:
            spy.stop()
        for name in ("first", "sshfs", "fetch", "readers"):
            path = work.parent / f"profile-{name}.txt"
            if path.exists():
                b.raw.append(f"profile of the daemon, {name} (py-spy --native, {path}):")
                b.raw += ["  " + line for line in profile_summary(path)]
    return b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", help="model size, e.g. 1G (repeatable; default 1G, 64M --quick)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 repetition, 8 readers: proves it works")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--reps", type=int, help="repetitions of each A/B pair (default 3, 1 with --quick)")
    parser.add_argument("--readers", type=int, help="concurrent readers (default 64, 8 with --quick)")
    parser.add_argument("--missing", type=int, default=200, help="missing names to stat (default 200)")
    parser.add_argument("--server", choices=("router", "nginx"), default="router",
                        help="what serves the blobs to both modelfs and curl (default: the test router)")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon in first read, sshfs, fetch")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the table has every row of every case "
                        "run, each with its figure (what CI runs: --quick --check)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out",
                        help="where files are made (same disk as a real store; default bench/out)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (drop_caches, FUSE mounts, sshd)")
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    sizes = [parse_size(s) for s in (args.size or (["64M"] if args.quick else ["1G"]))]
    args.reps = args.reps or (1 if args.quick else 3)
    args.readers = args.readers or (8 if args.quick else 64)

    # `timeout` and CI stop a run with SIGTERM: clean up (unmount, stop every process) as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    began = time.monotonic()
    header = machine()  # before the run: the commit measured
    results: list[Bench] = []
    code = args.workdir / f"code-{os.getpid()}"
    try:
        # Every daemon of this run runs this copy of modelfs/, whatever happens to the work tree meanwhile.
        shutil.copytree(ROOT / "modelfs", code / "modelfs", ignore=shutil.ignore_patterns("__pycache__"))
        for size in sizes:
            janitor = Janitor()  # everything of one size: mounts, servers, then the work dir itself
            work = args.workdir / f"work-{os.getpid()}"
            janitor.push(f"work dir {work}", lambda w=work: rmtree(w))  # type: ignore[misc]
            try:
                work.mkdir(parents=True)
                results.append(run_size(args, size, cases, janitor, work, code))
            finally:
                janitor.close()
    finally:
        rmtree(code)
    print()
    print("modelfs benchmark:", " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]))
    for line in header:
        print(line)
    rows = [dataclasses.replace(r, case=f"[{b.size / MIB:.0f} MiB] {r.case}" if len(results) > 1 else r.case)
            for b in results for r in b.rows]
    print(f"model size {', '.join(f'{b.size} bytes' for b in results)}; {args.reps} repetition(s) per side, "
          f"interleaved, medians; {time.monotonic() - began:.0f}s")
    print("modelfs: the mount as configured by default (passthrough here); daemon path: MODELFS_PASSTHROUGH=off; "
          "ratios are to the direct path")
    print()
    print("\n".join(table(rows)))
    print()
    measured = ", ".join(f"{b.size / MIB:.0f} MiB" for b in results)
    subtitle = f"{measured}, {args.reps} rep(s), kernel {platform.release()}"
    print(chart(rows, args.workdir / "passthrough.png", subtitle))
    print(download_chart(rows, args.workdir / "downloads.png", subtitle))
    for b in results:
        print()
        print(f"raw numbers ({b.size / MIB:.0f} MiB; median [min..max]):")
        print("\n".join(f"  {line}" for line in b.raw))
    if not args.check:
        return 0
    problems = [f"[{b.size / MIB:.0f} MiB] {problem}" for b in results for problem in check(b.case_rows, ROWS)]
    print()
    print("\n".join(f"check: {problem}" for problem in problems) or
          f"check: {sum(len(b.rows) for b in results)} rows of {len(cases)} case(s), each with its figure")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
