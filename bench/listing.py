"""Listing bench: do listings cost what they list? (issue 13)

    .venv/bin/python -m bench.listing [--store-models 10000] [--shared-models 5000] [--prefixes 100] [--reps 5]

Grows a tree of tiny models (the store and one shared directory, plain local directories, `org<N>/<model>` in the
llmlb layout, every seventh one flat), mounts modelfs over them, and times against the direct path:
`ls -l` of one prefix, `ls -lR /models` against `find -ls` (and `ls -lR`) over the backing directories, `find
/models -ls` (which, unlike `ls -l`, sends no `getxattr` per entry), and `modelfs status`. Every timed command
is a fresh process; runs are 1.1 s apart so the kernel's 1 s entry cache has expired and every run reaches the
daemon. Targets: `ls -l` of a prefix ≤ 50 ms, `ls -lR` ≤ 3× `find`,
status ≤ 3 s. From the repository root, as root (FUSE). Everything is made in bench/out/listing-PID and removed
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import MIB, PYTHON, ROOT, Janitor, median, rmtree, spread, start_mount, timed


def grow(root: Path, models: int, prefixes: int, tag: str) -> None:
    per_prefix = models // prefixes
    for p in range(prefixes):
        for i in range(per_prefix):
            data = f"GGUF {tag} org{p}/{tag}{i}".encode()
            if i % 7 == 3:
                path = root / f"org{p}" / f"{tag}{i}.gguf"
            else:
                path = root / f"org{p}" / f"{tag}{i}" / "model.gguf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def runs(cmd: list[str], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        time.sleep(1.1)
        out.append(timed(cmd))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-models", type=int, default=10_000)
    parser.add_argument("--shared-models", type=int, default=5_000)
    parser.add_argument("--prefixes", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.listing runs as root (FUSE)", file=sys.stderr)
        return 2
    work = ROOT / "bench" / "out" / f"listing-{os.getpid()}"
    janitor = Janitor()
    janitor.push("work directory", lambda: rmtree(work))
    try:
        store, shared, mnt = work / "store", work / "shared", work / "mnt"
        started = time.monotonic()
        grow(store, args.store_models, args.prefixes, "s")
        grow(shared, args.shared_models, args.prefixes, "h")
        print(f"tree: {args.store_models} store + {args.shared_models} shared models in {args.prefixes} prefixes, "
              f"grown in {time.monotonic() - started:.1f}s")
        m = start_mount(janitor, mnt, store, ["--shared", str(shared)], work / "modelfs.log")
        prefix = "org42" if args.prefixes > 42 else "org0"
        listing = subprocess.run(["ls", "-l", str(mnt / prefix)], capture_output=True, text=True, check=True)
        entries = len(listing.stdout.splitlines()) - 1
        total = int(subprocess.run(f"ls -lR {mnt} | grep -c '\\.gguf$'", shell=True, capture_output=True,
                                   text=True).stdout)
        status = json.loads(subprocess.run([PYTHON, "-m", "modelfs", "status", str(mnt), "--json"],
                                           capture_output=True, text=True, check=True, cwd=ROOT).stdout)
        print(f"check: ls -l {prefix} lists {entries} entries; ls -lR lists {total} models; status lists "
              f"{len(status['models'])} models (expected {args.store_models + args.shared_models})")
        ls_prefix = runs(["ls", "-l", str(mnt / prefix)], args.reps)
        ls_prefix_direct = runs(["ls", "-l", str(store / prefix), str(shared / prefix)], args.reps)
        ls_root = runs(["ls", "-l", str(mnt)], args.reps)
        ls_r = runs(["ls", "-lR", str(mnt)], args.reps)
        find = runs(["find", str(store), str(shared), "-ls"], args.reps)
        find_mount = runs(["find", str(mnt), "-ls"], args.reps)
        ls_r_direct = runs(["ls", "-lR", str(store), str(shared)], args.reps)
        stat_status = runs([PYTHON, "-m", "modelfs", "status", str(mnt)], args.reps)
        rss = m.peak_rss() // MIB
        m.stop()
        print()
        print(f"{'measurement':48} {'median s':>9}  target")
        rows = [
            (f"ls -l /models/{prefix} ({entries} entries)", median(ls_prefix), "<= 0.050 s"),
            (f"ls -l of the backing {prefix} dirs (direct)", median(ls_prefix_direct), ""),
            ("ls -l /models (the prefixes)", median(ls_root), ""),
            ("ls -lR /models", median(ls_r), ""),
            ("find STORE SHARED -ls (direct)", median(find), ""),
            ("ls -lR STORE SHARED (direct)", median(ls_r_direct), ""),
            ("ls -lR /models ÷ find -ls", median(ls_r) / median(find), "<= 3x"),
            ("find /models -ls (no getxattr per entry)", median(find_mount), ""),
            ("find /models -ls ÷ find -ls", median(find_mount) / median(find), ""),
            ("modelfs status", median(stat_status), "<= 3 s"),
        ]
        for what, value, target in rows:
            print(f"{what:48} {value:9.3f}  {target}")
        print()
        print("raw (median [min..max]):")
        for what, values in (("ls -l prefix", ls_prefix), ("ls -l prefix direct", ls_prefix_direct),
                             ("ls -l root", ls_root), ("ls -lR mount", ls_r), ("find -ls", find),
                             ("find -ls mount", find_mount),
                             ("ls -lR direct", ls_r_direct), ("modelfs status", stat_status)):
            print(f"  {what}: {spread(values)} s")
        print(f"  daemon peak RSS: {rss} MiB")
    finally:
        janitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
