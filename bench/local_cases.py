"""Bench cases on a model in the store (no download): `warm`, `first`, `mmap`, `localload`, `pagecache`, and `stat`
of missing names. Each reads through passthrough (the base) and the daemon path, against the backing file.
"""

from __future__ import annotations

import os
import statistics
from functools import partial
from pathlib import Path

from bench.core import (
    BASE,
    DAEMON,
    LOCAL,
    Bench,
    Lever,
    Result,
    c_read_bytes,
    cat,
    daemon_row,
    interleave,
    io_path,
    probe,
    ratio_row,
    wants_passthrough,
)
from bench.harness import cpu_seconds, drop_caches, evict, median, prefault, spread
from bench.report import Row

# Cases. Each modelfs measurement starts its own daemon unless the case says otherwise; every run makes the
# files it assumes cached fully cached right before it is timed, after pre-faulting the memory it will fill.


def case_warm(b: Bench) -> None:
    m = b.mount(BASE)
    d = b.mount(DAEMON, mnt="mnt-daemon")
    try:
        path, daemon_path = m.model(LOCAL), d.model(LOCAL)
        for p in (path, daemon_path):
            cat(p)  # daemon path: the first open renews the page cache; pages come from the daemon
            cat(p)  # an open of an unchanged, settled file keeps it: from now on reads never reach the daemon
        b.expect_io(path, "passthrough")
        b.expect_io(daemon_path, "daemon")
        cpu, daemon_cpu = cpu_seconds(m.pid), cpu_seconds(d.pid)

        def passthrough() -> Result:
            b.warm(b.local)  # passthrough reads the backing file's pages
            return {"MB/s": b.mb_s(cat(path))}

        def direct() -> Result:
            b.warm(b.local)  # the daemon may have dropped the backing pages behind its reads
            return {"MB/s": b.mb_s(cat(b.local))}

        mine, daemon, plain = interleave(b, [passthrough, lambda: {"MB/s": b.mb_s(cat(daemon_path))}, direct],
                                         max(b.reps, 5))
        cpu, daemon_cpu = cpu_seconds(m.pid) - cpu, cpu_seconds(d.pid) - daemon_cpu
    finally:
        d.stop()
        m.stop()
    b.note(f"warm read: passthrough MB/s {spread(mine['MB/s'], '{:.0f}')}, daemon path "
           f"{spread(daemon['MB/s'], '{:.0f}')}, direct {spread(plain['MB/s'], '{:.0f}')}; daemon CPU during the "
           f"warm reads {cpu:.2f}s / {daemon_cpu:.2f}s (0 = the kernel alone)")
    b.rows.append(ratio_row("warm read (cat, caches warm)", "MB/s", mine["MB/s"], plain["MB/s"], 0.95,
                            daemon=daemon["MB/s"]))


def first_read(b: Bench, lever: Lever, profile: str | None = None) -> Result:
    """A fresh mount reads the local model once; its backing file is in the page cache."""
    m = b.mount(lever, profile=profile)
    try:
        prefault(b.size)
        b.warm(b.local)
        cpu, in_c = cpu_seconds(m.pid), c_read_bytes(m.mnt)
        seconds = cat(m.model(LOCAL))
        cpu, in_c = cpu_seconds(m.pid) - cpu, c_read_bytes(m.mnt) - in_c
        b.expect_io(m.model(LOCAL), "passthrough" if wants_passthrough(lever) else "daemon")
        # The share of the file's bytes the daemon answered in C (0 with passthrough: the kernel reads them).
        return {"MB/s": b.mb_s(seconds), "cpu s/GiB": cpu * (1 << 30) / b.size, "in C": in_c / b.size}
    finally:
        m.stop()


def direct_read(b: Bench) -> Result:
    prefault(b.size)
    b.warm(b.local)
    return {"MB/s": b.mb_s(cat(b.local))}


def case_first(b: Bench) -> None:
    mine, daemon, direct = interleave(b, [lambda: first_read(b, BASE), lambda: first_read(b, DAEMON),
                                          lambda: direct_read(b)], b.reps)
    b.note(f"first read: passthrough MB/s {spread(mine['MB/s'], '{:.0f}')} (daemon CPU "
           f"{spread(mine['cpu s/GiB'], '{:.3f}')} s/GiB), daemon path {spread(daemon['MB/s'], '{:.0f}')} (daemon "
           f"CPU {spread(daemon['cpu s/GiB'], '{:.2f}')} s/GiB, share of the bytes answered in C "
           f"{spread(daemon['in C'], '{:.2f}')}), direct (page cache) {spread(direct['MB/s'], '{:.0f}')}")
    b.rows.append(ratio_row("first read via fresh mount (backing cached)", "MB/s", mine["MB/s"], direct["MB/s"], 0.95,
                            daemon=daemon["MB/s"]))
    cpu, daemon_cpu = median(mine["cpu s/GiB"]), median(daemon["cpu s/GiB"])
    b.rows.append(Row("daemon CPU per GiB read (local model, first read)", f"{cpu:.3f} s", "—", None, "≤ 0.01 s",
                      cpu <= 0.01, daemon=f"{daemon_cpu:.3f} s"))
    # Issue 18's targets for the daemon path (a kernel without passthrough), as rows of their own.
    b.rows.append(daemon_row("first read via fresh mount (backing cached)", "MB/s", daemon["MB/s"], direct["MB/s"],
                             0.35))
    b.rows.append(Row("daemon path: daemon CPU per GiB read (first read)", f"{daemon_cpu:.3f} s", "—", None,
                      "≤ 0.15 s", daemon_cpu <= 0.15))
    if b.profile:
        first_read(b, BASE, profile="first")


def mmap_touch(path: Path, every: str = "page") -> float:
    return float(probe("mmap-touch", str(path), every)["seconds"])  # type: ignore[arg-type]


def mmap_mount(b: Bench, lever: Lever) -> Result:
    """A fresh mount: mmap + touch every page ("first"), again ("warm"), then read every byte via mmap."""
    m = b.mount(lever)
    try:
        prefault(b.size)
        b.warm(b.local)
        first = mmap_touch(m.model(LOCAL))
        cpu = cpu_seconds(m.pid)
        warm_touch = mmap_touch(m.model(LOCAL))
        cpu = cpu_seconds(m.pid) - cpu
        b.expect_io(m.model(LOCAL), "passthrough" if wants_passthrough(lever) else "daemon")
        return {"first MB/s": b.mb_s(first), "warm MB/s": b.mb_s(warm_touch), "warm daemon cpu s": cpu,
                "warm bytes MB/s": b.mb_s(mmap_touch(m.model(LOCAL), "byte"))}
    finally:
        m.stop()


def mmap_direct(b: Bench) -> Result:
    prefault(b.size)
    b.warm(b.local)
    first = mmap_touch(b.local)
    return {"first MB/s": b.mb_s(first), "warm MB/s": b.mb_s(mmap_touch(b.local)),
            "warm bytes MB/s": b.mb_s(mmap_touch(b.local, "byte"))}


def case_mmap(b: Bench) -> None:
    mine, daemon, direct = interleave(b, [lambda: mmap_mount(b, BASE), lambda: mmap_mount(b, DAEMON),
                                          lambda: mmap_direct(b)], b.reps)
    for label, got in (("passthrough", mine), ("daemon path", daemon)):
        b.note(f"mmap touch of every page, {label}: first {spread(got['first MB/s'], '{:.0f}')} warm "
               f"{spread(got['warm MB/s'], '{:.0f}')} MB/s (daemon CPU in the warm run "
               f"{spread(got['warm daemon cpu s'], '{:.2f}')} s)")
    b.note(f"mmap touch of every page, backing file: {spread(direct['first MB/s'], '{:.0f}')} / "
           f"{spread(direct['warm MB/s'], '{:.0f}')} MB/s (backing cached; 'first' is a new mapping in a new process)")
    b.note(f"mmap read of every byte, warm: passthrough {spread(mine['warm bytes MB/s'], '{:.0f}')} MB/s, daemon "
           f"path {spread(daemon['warm bytes MB/s'], '{:.0f}')} MB/s, backing file "
           f"{spread(direct['warm bytes MB/s'], '{:.0f}')} MB/s")
    b.rows.append(ratio_row("mmap + touch every page: first", "MB/s", mine["first MB/s"], direct["first MB/s"], 0.9,
                            daemon=daemon["first MB/s"]))
    b.rows.append(ratio_row("mmap + touch every page: warm", "MB/s", mine["warm MB/s"], direct["warm MB/s"], 0.95,
                            daemon=daemon["warm MB/s"]))
    b.rows.append(ratio_row("mmap read of every byte: warm", "MB/s", mine["warm bytes MB/s"],
                            direct["warm bytes MB/s"], 0.95, daemon=daemon["warm bytes MB/s"]))


def local_load(b: Bench, lever: Lever | None, cached: bool) -> Result:
    """GGUFReader + touch every tensor of the local model, through a fresh mount (or directly with no lever),
    with the backing file fully cached or dropped from the page cache (read from disk)."""
    m = b.mount(lever) if lever else None
    try:
        path = m.model(LOCAL) if m else b.local
        prefault(b.size)
        if cached:
            b.warm(b.local)
        else:
            evict(b.local)
        cpu = cpu_seconds(m.pid) if m else 0.0
        seconds = float(probe("gguf-load", str(path))["seconds"])  # type: ignore[arg-type]
        if m and lever:
            cpu = cpu_seconds(m.pid) - cpu
            b.expect_io(path, "passthrough" if wants_passthrough(lever) else "daemon")
        return {"s": seconds, "cpu s/GiB": cpu * (1 << 30) / b.size}
    finally:
        if m:
            m.stop()


def case_localload(b: Bench) -> None:
    for cached in (False, True):
        state = "backing cached" if cached else "backing dropped, from disk"
        runs = [partial(local_load, b, lever, cached) for lever in (BASE, DAEMON, None)]
        mine, daemon, direct = interleave(b, runs, b.reps)
        b.note(f"load of a local model ({state}): passthrough {spread(mine['s'])} s (daemon CPU "
               f"{spread(mine['cpu s/GiB'], '{:.3f}')} s/GiB), daemon path {spread(daemon['s'])} s (daemon CPU "
               f"{spread(daemon['cpu s/GiB'], '{:.2f}')} s/GiB), directly {spread(direct['s'])} s")
        # Targets on throughput (≥ 0.95× of direct) are ≤ 1/0.95 of its time.
        b.rows.append(ratio_row(f"load of a local model: GGUFReader + all tensors ({state})", "s", mine["s"],
                                direct["s"], round(1 / 0.95, 2), higher=False, daemon=daemon["s"]))
        if not cached:
            b.rows.append(daemon_row("load of a local model from disk (GGUFReader + all tensors)", "s", daemon["s"],
                                     direct["s"], 1.25, higher=False))


def stat_missing(b: Bench, lever: Lever | None) -> list[float]:
    """Milliseconds of each stat of a distinct missing name: in a fresh mount (router 404), or with no lever in a
    plain directory of the store's disk."""
    if lever is None:
        empty = b.work / "empty-dir"
        empty.mkdir(exist_ok=True)
        ms: list[float] = probe("stat-missing", str(empty), str(b.missing), "missing-")["ms"]  # type: ignore[assignment]
        return ms
    m = b.mount(lever, b.work / "empty-store", ("--router", b.url))
    try:
        os.stat(m.path)
        ms = probe("stat-missing", str(m.path), str(b.missing), "missing-")["ms"]  # type: ignore[assignment]
    finally:
        m.stop()
    return ms


def p99(ms: list[float]) -> float:
    return statistics.quantiles(ms, n=100)[98] if len(ms) >= 2 else ms[0]


def case_stat(b: Bench) -> None:
    ms, daemon, plain = stat_missing(b, BASE), stat_missing(b, DAEMON), stat_missing(b, None)
    for label, got in (("passthrough", ms), ("daemon path", daemon), ("plain directory", plain)):
        b.note(f"stat of {len(got)} missing names, {label}: p50 {median(got):.2f} ms, p99 {p99(got):.2f} ms, max "
               f"{max(got):.2f} ms")
    b.rows.append(Row(f"stat of a missing name (router 404), {len(ms)} names", f"p99 {p99(ms):.1f} ms",
                      f"p99 {p99(plain):.2f} ms (plain dir)", None, "p99 ≤ 20 ms", p99(ms) <= 20,
                      daemon=f"p99 {p99(daemon):.1f} ms"))


def page_cache(b: Bench, lever: Lever) -> Result:
    """Drop all caches, read the local model once through a fresh mount, count cached pages of both files."""
    m = b.mount(lever)
    try:
        drop_caches()
        prefault(2 * b.size)
        got = probe("read-cache", str(m.model(LOCAL)), str(b.local))
    finally:
        m.stop()
    io = io_path(str(got.pop("io")))
    if io != ("passthrough" if wants_passthrough(lever) else "daemon"):
        raise RuntimeError(f"page cache run ({lever.name}) was served by {io}")
    share = {key: int(value) / b.size for key, value in got.items()}  # type: ignore[call-overload]
    if io == "passthrough":  # the FUSE file's mapping is the backing file's: its pages are the backing pages
        share["mount"] = share["mount_open"] = 0.0
    return {"ratio": share["mount"] + share["backing"], "mount": share["mount"], "backing": share["backing"],
            "while open": share["mount_open"] + share["backing_open"]}


def case_pagecache(b: Bench) -> None:
    rows = []
    for lever in (BASE, DAEMON):
        got = page_cache(b, lever)
        label = "passthrough" if lever is BASE else "daemon path"
        b.note(f"page cache after one read via the mount, {label}, reader closed: FUSE file {got['mount']:.2f}× + "
               f"backing file {got['backing']:.2f}× the size; {got['while open']:.2f}× before the reader closed")
        rows.append(got["ratio"])
    b.rows.append(Row("page cache after a full read via mount", f"{rows[0]:.2f}× size", "1.00× size", rows[0],
                      "≤ 1.1×", rows[0] <= 1.1, daemon=f"{rows[1]:.2f}× size", daemon_ratio=rows[1]))
