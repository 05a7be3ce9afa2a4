"""modelfs benchmark: every case compares modelfs with the direct path in the same run and prints one table.

    .venv/bin/python -m bench.run --size 1G [--size 8G] [--quick] [--cases warm,first,...] [--profile] [--check]

From the repository root. It creates its own GGUF files, router (the test router, or nginx with --server nginx),
sshd + sshfs and modelfs mounts (all from tests.support) in a work directory on the disk of the repository
(removed at the end), runs each case as interleaved A/B repetitions (median reported) and never leaves a mount or
a process behind, also when stopped by SIGINT or SIGTERM. Root only (page cache control, FUSE, sshd). --check
fails the run unless its table has every row of every case run, each with its figure. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.core import (
    BASE,
    DAEMON,
    LOCAL,
    REMOTE,
    SMALL,
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
    wait_promoted,
    wants_passthrough,
)
from bench.harness import (
    MIB,
    ROOT,
    Janitor,
    Nginx,
    RouterProcess,
    RssSampler,
    cpu_seconds,
    drop_caches,
    evict,
    make_gguf_of_size,
    median,
    prefault,
    profile_summary,
    rmtree,
    spread,
    sshfs_available,
    start_router,
    start_sshfs,
    timed,
)
from bench.report import Row, chart, check, download_chart, machine, table

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


def sshfs_read(b: Bench, lever: Lever, profile: str | None = None, share: Path | None = None) -> Result:
    """A fresh mount whose only source is the sshfs share (default: the direct_io one) reads the model once."""
    share = share or b.sshfs_dir
    assert share is not None
    m = b.mount(lever, b.work / "empty-store", ("--shared", str(share)), profile=profile)
    try:
        prefault(b.size)
        b.warm(b.remote)  # what the sshfs server reads
        cpu = cpu_seconds(m.pid)
        seconds = cat(m.model(REMOTE))
        cpu = cpu_seconds(m.pid) - cpu
        # sshfs -o direct_io cannot map files shared: modelfs serves it by the daemon path even with passthrough.
        io = "passthrough" if wants_passthrough(lever) and share != b.sshfs_dir else "daemon"
        b.expect_io(m.model(REMOTE), io)
        return {"MB/s": b.mb_s(seconds), "cpu s/GiB": cpu * (1 << 30) / b.size}
    finally:
        m.stop()


def ensure_sshfs(b: Bench) -> None:
    if b.sshfs_dir is None:
        b.sshfs_dir = b.work / "sshfs"
        b.sshfs_mount = start_sshfs(b.janitor, b.work / "origin", b.sshfs_dir)


def ensure_sshfs_cached(b: Bench) -> None:
    if b.sshfs_cached_dir is None:
        start_sshfs(b.janitor, b.work / "origin", b.work / "sshfs-cached", direct_io=False)
        b.sshfs_cached_dir = b.work / "sshfs-cached"


def case_sshfs(b: Bench) -> None:
    reason = sshfs_available()
    if reason:
        b.note(f"sshfs case skipped: {reason}")
        b.rows.append(Row("shared dir (sshfs, default I/O) read via mount", "skipped", "—", None, "≥ 1.0×", None))
        b.rows.append(Row("shared dir (sshfs -o direct_io) read via mount", "skipped", "—", None, "≥ 0.9×", None))
        return
    try:  # sshfs with its default I/O options: passthrough serves it
        ensure_sshfs_cached(b)
    except RuntimeError as exc:
        b.note(f"sshfs (default I/O) skipped: {str(exc).splitlines()[0]}")
        b.rows.append(Row("shared dir (sshfs, default I/O) read via mount", "skipped", "—", None, "≥ 1.0×", None))
    else:
        assert b.sshfs_cached_dir is not None
        share = b.sshfs_cached_dir
        mine, daemon, plain = interleave(b, [lambda: sshfs_read(b, BASE, share=share),
                                             lambda: sshfs_read(b, DAEMON, share=share),
                                             partial(sshfs_direct, b, share)], b.reps)
        b.note(f"sshfs (default I/O) read: passthrough MB/s {spread(mine['MB/s'], '{:.0f}')} (daemon CPU "
               f"{spread(mine['cpu s/GiB'], '{:.3f}')} s/GiB), daemon path {spread(daemon['MB/s'], '{:.0f}')} "
               f"(daemon CPU {spread(daemon['cpu s/GiB'], '{:.2f}')} s/GiB), sshfs directly "
               f"{spread(plain['MB/s'], '{:.0f}')} (no sshfs caches but the kernel's page cache, dropped at each "
               "open; server file cached)")
        b.rows.append(ratio_row("shared dir (sshfs, default I/O) read via mount", "MB/s", mine["MB/s"],
                                plain["MB/s"], 1.0, daemon=daemon["MB/s"]))
    ensure_sshfs(b)  # direct_io: no shared mmap, so passthrough falls back to the daemon path for this share
    assert b.sshfs_dir is not None
    mine, daemon, plain = interleave(b, [lambda: sshfs_read(b, BASE), lambda: sshfs_read(b, DAEMON),
                                         partial(sshfs_direct, b, b.sshfs_dir)], b.reps)
    b.note(f"sshfs -o direct_io read: modelfs (auto, falls back to the daemon path) MB/s "
           f"{spread(mine['MB/s'], '{:.0f}')} (daemon CPU {spread(mine['cpu s/GiB'], '{:.2f}')} s/GiB), "
           f"--passthrough off {spread(daemon['MB/s'], '{:.0f}')}, sshfs directly {spread(plain['MB/s'], '{:.0f}')} "
           "(sshfs with direct_io and no caches, as in tests/support/sshfs.py; server file cached)")
    b.rows.append(ratio_row("shared dir (sshfs -o direct_io) read via mount (daemon fallback)", "MB/s", mine["MB/s"],
                            plain["MB/s"], 0.9, daemon=daemon["MB/s"]))
    if b.profile:
        sshfs_read(b, BASE, profile="sshfs")


def sshfs_direct(b: Bench, share: Path) -> Result:
    prefault(b.size)
    b.warm(b.remote)
    return {"MB/s": b.mb_s(cat(share / REMOTE / "model.gguf"))}


def test_router(b: Bench) -> RouterProcess:
    """The test router (llmlb flavour: it ignores Range, so one stream), started once per run if --server is nginx."""
    if b.router is None:
        b.router = start_router(b.janitor, b.work / "origin")
    return b.router


def cold_fetch(b: Bench, lever: Lever, profile: str | None = None) -> Result:
    """Fresh store and mount; `cat` of the router-only model from the test router (open → last byte), then a second
    `cat`."""
    store = b.work / "cold-store"
    rmtree(store)
    m = b.mount(lever, store, ("--router", test_router(b).url), profile=profile)
    try:
        prefault(2 * b.size)
        b.warm(b.remote)  # the router serves from its page cache, for curl too
        cpu = cpu_seconds(m.pid)
        with RssSampler(m.pid) as rss:
            seconds = cat(m.model(REMOTE))
            wait_promoted(store)
        cpu = cpu_seconds(m.pid) - cpu
        b.rss.append((f"cold fetch ({lever.name})", max(rss.peak, m.peak_rss())))
        prefault(b.size)
        again = cat(m.model(REMOTE))
        return {"MB/s": b.mb_s(seconds), "reread MB/s": b.mb_s(again), "cpu s/GiB": cpu * (1 << 30) / b.size}
    finally:
        m.stop()
        os.sync()
        rmtree(store)


def curl_fetch(b: Bench) -> Result:
    return curl_url(b, test_router(b).url)


def case_fetch(b: Bench) -> None:
    """Cold fetch from the test router, which ignores Range as llmlb does: one stream, whatever the settings."""
    mine, curl = interleave(b, [lambda: cold_fetch(b, BASE), lambda: curl_fetch(b)], b.reps)
    b.note(f"cold fetch from the test router (one stream): modelfs MB/s {spread(mine['MB/s'], '{:.0f}')} (daemon "
           f"CPU {spread(mine['cpu s/GiB'], '{:.2f}')} s/GiB), curl -o {spread(curl['MB/s'], '{:.0f}')}; "
           f"second cat right after the download {spread(mine['reread MB/s'], '{:.0f}')} MB/s")
    b.rows.append(ratio_row("cold fetch from a router without Range: open → last byte (cat vs curl -o)", "MB/s",
                            mine["MB/s"], curl["MB/s"], 0.95))
    if b.profile:
        cold_fetch(b, BASE, profile="fetch")


def first_and_last(path: Path) -> tuple[float, float]:
    """Seconds from open to the first MiB at offset 0, and to the last byte, of one sequential reader."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < MIB and (chunk := f.read(MIB - got)):
            got += len(chunk)
        first = time.perf_counter() - start
        while f.read(8 * MIB):
            pass
    return first, time.perf_counter() - start


def streams_lever(streams: int) -> Lever:
    return Lever(f"{streams} streams", settings=(("MODELFS_DOWNLOAD_STREAMS", str(streams)),))


def nginx_fetch(b: Bench, url: str, lever: Lever) -> Result:
    """Fresh store and mount fetching from `url`; one reader from byte 0 to the last byte."""
    store = b.work / "cold-store"
    rmtree(store)
    m = b.mount(lever, store, ("--router", url))
    try:
        prefault(2 * b.size)
        b.warm(b.remote)
        cpu = cpu_seconds(m.pid)
        first, seconds = first_and_last(m.model(REMOTE))
        wait_promoted(store)
        cpu = cpu_seconds(m.pid) - cpu
        return {"MB/s": b.mb_s(seconds), "first MiB share": first / seconds, "cpu s/GiB": cpu * (1 << 30) / b.size}
    finally:
        m.stop()
        os.sync()
        rmtree(store)


def curl_url(b: Bench, url: str) -> Result:
    out = b.work / "curl.gguf"
    prefault(2 * b.size)
    b.warm(b.remote)
    seconds = timed(["curl", "-sSf", "-o", str(out), f"{url}/v0/models/blob/{REMOTE}"])
    os.sync()
    out.unlink()
    return {"MB/s": b.mb_s(seconds)}


def case_nginx(b: Bench) -> None:
    """Cold fetch from a plain nginx (Range natively), unlimited and limited to 25 MB/s per connection."""
    plain = Nginx(b.janitor, b.work / "origin", b.work / "nginx-plain")
    limited = Nginx(b.janitor, b.work / "origin", b.work / "nginx-25m", limit_rate="25m")
    base = streams_lever(8)
    mine, curl = interleave(b, [lambda: nginx_fetch(b, plain.url, base), lambda: curl_url(b, plain.url)], b.reps)
    (one,) = interleave(b, [lambda: nginx_fetch(b, plain.url, streams_lever(1))], b.reps)
    (four,) = interleave(b, [lambda: nginx_fetch(b, plain.url, streams_lever(4))], b.reps)
    b.note(f"cold fetch from nginx: modelfs MB/s download_streams=8 (default) {spread(mine['MB/s'], '{:.0f}')} "
           f"(daemon CPU {spread(mine['cpu s/GiB'], '{:.2f}')} s/GiB), =4 {spread(four['MB/s'], '{:.0f}')}, =1 "
           f"{spread(one['MB/s'], '{:.0f}')} (CPU {spread(one['cpu s/GiB'], '{:.2f}')}); "
           f"curl -o {spread(curl['MB/s'], '{:.0f}')}")
    b.rows.append(ratio_row("cold fetch from nginx: open → last byte (cat vs curl -o)", "MB/s", mine["MB/s"],
                            curl["MB/s"], 0.95))
    lmine, lcurl = interleave(b, [lambda: nginx_fetch(b, limited.url, base), lambda: curl_url(b, limited.url)], 1)
    # nginx's limit_rate lets each request send one second's worth at once (25 MB): an 8 MiB part is never slowed
    # down. Parts of 1/8 of the model show how much of the ratio that burst makes.
    big = Lever("8 streams, 8 parts", settings=(*base.settings, ("MODELFS_DOWNLOAD_PART_SIZE", str(b.size // 8 + 1))))
    (lbig,) = interleave(b, [lambda: nginx_fetch(b, limited.url, big)], 1)
    b.note(f"cold fetch from nginx, 25 MB/s per connection: modelfs {spread(lmine['MB/s'], '{:.0f}')} MB/s "
           f"(with parts of 1/8 of the model, so nginx's one-second burst per request counts little: "
           f"{spread(lbig['MB/s'], '{:.0f}')} MB/s, {median(lbig['MB/s']) / median(lcurl['MB/s']):.2f}× curl), "
           f"curl -o {spread(lcurl['MB/s'], '{:.0f}')} MB/s; first MiB at {spread(lmine['first MiB share'])} "
           "of the download time")
    b.rows.append(ratio_row("cold fetch, nginx 25 MB/s per connection (streams vs one curl -o)", "MB/s",
                            lmine["MB/s"], lcurl["MB/s"], 4.0))
    share = median(lmine["first MiB share"])
    b.rows.append(Row("first MiB at offset 0, nginx 25 MB/s per connection", f"{share:.3f} of download",
                      "—", share, "≤ 0.1×", share <= 0.1))



def cold_load(b: Bench, lever: Lever) -> Result:
    store = b.work / "cold-store"
    rmtree(store)
    m = b.mount(lever, store, ("--router", b.url))
    try:
        prefault(2 * b.size)
        b.warm(b.remote)
        with RssSampler(m.pid) as rss:
            seconds = float(probe("gguf-load", str(m.model(REMOTE)))["seconds"])  # type: ignore[arg-type]
            wait_promoted(store)
        b.rss.append((f"cold load ({lever.name})", max(rss.peak, m.peak_rss())))
        return {"s": seconds}
    finally:
        m.stop()
        os.sync()
        rmtree(store)


def curl_then_load(b: Bench) -> Result:
    out = b.work / "curl.gguf"
    prefault(2 * b.size)
    b.warm(b.remote)
    fetch = timed(["curl", "-sSf", "-o", str(out), f"{b.url}/v0/models/blob/{REMOTE}"])
    load = float(probe("gguf-load", str(out))["seconds"])  # type: ignore[arg-type]
    os.sync()
    out.unlink()
    return {"s": fetch + load, "fetch s": fetch, "load s": load}


def case_load(b: Bench) -> None:
    mine, direct = interleave(b, [lambda: cold_load(b, BASE), lambda: curl_then_load(b)], b.reps)
    b.note(f"cold load: modelfs {spread(mine['s'])} s; curl -o then load {spread(direct['s'])} s "
           f"(curl {spread(direct['fetch s'])} + load {spread(direct['load s'])})")
    b.rows.append(ratio_row(f"cold load from {b.server}: GGUFReader + touch all tensors", "s", mine["s"], direct["s"],
                            1.0, higher=False))


def readers(b: Bench, lever: Lever, count: int, profile: str | None = None) -> Result:
    """Fresh store and mount; `count` dd processes each read their slice of the router-only model at once."""
    assert b.counter is not None and b.sent is not None
    store = b.work / "cold-store"
    rmtree(store)
    m = b.mount(lever, store, ("--router", b.url), profile=profile)
    try:
        path = m.model(REMOTE)
        size = os.stat(path).st_size
        prefault(2 * b.size)
        b.warm(b.remote)
        b.counter()
        step = -(-size // count)
        cpu = cpu_seconds(m.pid)
        start = time.perf_counter()
        procs = [subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=skip_bytes,count_bytes",
                                   f"skip={i * step}", f"count={step}", "status=none"]) for i in range(count)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - start
        if any(codes):
            raise RuntimeError(f"a reader failed: {codes}")
        wait_promoted(store)
        cpu = cpu_seconds(m.pid) - cpu
        b.rss.append((f"{count} readers ({lever.name})", m.peak_rss()))
        time.sleep(0.2)  # the server counts a body's bytes as it sends them; let it finish its bookkeeping
        return {"wall s": wall, "sent/size": b.sent(REMOTE) / size, "cpu s/GiB": cpu * (1 << 30) / b.size}
    finally:
        m.stop()
        os.sync()
        rmtree(store)


def case_readers(b: Bench) -> None:
    many, one = interleave(b, [lambda: readers(b, BASE, b.readers), lambda: readers(b, BASE, 1)], b.reps)
    b.note(f"{b.readers} readers: wall {spread(many['wall s'])} s, router sent {spread(many['sent/size'])}× the "
           f"size, daemon CPU {spread(many['cpu s/GiB'], '{:.2f}')} s/GiB; 1 reader: wall {spread(one['wall s'])} s, "
           f"sent {spread(one['sent/size'])}×, daemon CPU {spread(one['cpu s/GiB'], '{:.2f}')} s/GiB")
    b.rows.append(ratio_row(f"{b.readers} concurrent cold readers: wall", "s", many["wall s"], one["wall s"], 1.1,
                            higher=False))
    if b.profile:
        readers(b, BASE, b.readers, profile="readers")
    sent = max(many["sent/size"])
    b.rows.append(Row(f"{b.readers} concurrent cold readers: router bytes sent", f"{sent:.3f}× size", "—", sent,
                      "≤ 1.05×", sent <= 1.05))


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


BIG = "bench/big"  # the model of the rss case, only on its own nginx


def case_rss(b: Bench) -> None:
    """Peak RSS of the daemon while `cat` streams a cold model from nginx (Range honoured: parallel parts where they
    pay): 2 GiB, or 4x the model size when that is smaller (--quick)."""
    size = min(2 << 30, 4 * b.size)
    origin = b.work / "origin-big"
    big = origin / BIG / "model.gguf"
    make_gguf_of_size(big, size)
    hour_ago = time.time() - 3600
    os.utime(big, (hour_ago, hour_ago))
    server = Nginx(b.janitor, origin, b.work / "nginx-big")
    store = b.work / "cold-store"
    rmtree(store)
    m = b.mount(BASE, store, ("--router", server.url))
    try:
        prefault(2 * size)
        b.warm(big)
        cpu = cpu_seconds(m.pid)
        with RssSampler(m.pid) as rss:
            seconds = cat(m.model(BIG))
            final = store / BIG / "model.gguf"
            while not final.exists():
                time.sleep(0.01)
        cpu = cpu_seconds(m.pid) - cpu
        peak = max(rss.peak, m.peak_rss())
    finally:
        m.stop()
        os.sync()
        rmtree(store)
        big.unlink()
    b.note(f"{size / MIB:.0f} MiB from nginx: {size / seconds / 1e6:.0f} MB/s, daemon CPU "
           f"{cpu * (1 << 30) / size:.2f} s/GiB, peak RSS {peak / MIB:.0f} MiB; peak RSS of the other streaming "
           "runs: " + (", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in b.rss) or "none measured"))
    b.rows.append(Row(f"daemon peak RSS streaming {size / MIB:.0f} MiB from nginx", f"{peak / 1e6:.0f} MB", "—", None,
                      "≤ 100 MB", peak <= 100e6))


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


HUNG = "bench/hung"  # a name in the same directory that is nowhere local: its lookup asks the shared dir or router


def daemon_waits_on_fuse(pid: int) -> bool:
    """Whether a thread of `pid` sleeps in a FUSE request (the daemon's worker inside a stopped sshfs)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if "fuse" in (task / "wchan").read_text() or "request_wait_answer" in (task / "stack").read_text():
                return True
        except OSError:
            continue
    return False


def beside_hung_lookup(b: Bench, lever: Lever | None, fault: str) -> Result:
    """ms of `cat` of a small local model (a fresh lookup + open + read in a new process) while a lookup of another
    name in the same directory waits on a stalled router HEAD (`fault="router"`) or a stopped sshfs ("shared").
    Without a lever: the same `cat` of the backing file, for reference."""
    if lever is None:
        return {"ms": 1000 * cat(b.work / "store" / SMALL / "model.gguf")}
    args = ("--router", b.url) if fault == "router" else ("--shared", str(b.sshfs_dir))
    m = b.mount(lever, args=args)
    hung: subprocess.Popen[bytes] | None = None
    try:
        os.stat(m.path / "bench")  # the directory's own lookup (store) is not what is measured
        deadline = time.monotonic() + 10
        if fault == "router":
            assert b.router is not None
            b.router.reset()
            b.router.control(hang=True, models=[HUNG])
            hung = subprocess.Popen(["stat", str(m.model(HUNG))], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            while not any(r["method"] == "HEAD" and r["name"] == HUNG for r in b.router.stats()["requests"]):
                if time.monotonic() > deadline or hung.poll() is not None:
                    raise RuntimeError("the router never held the HEAD of the stalled lookup")
                time.sleep(0.01)
        else:
            assert b.sshfs_mount is not None
            b.sshfs_mount.stop()
            hung = subprocess.Popen(["stat", str(m.model(HUNG))], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            while not daemon_waits_on_fuse(m.pid):
                if time.monotonic() > deadline or hung.poll() is not None:
                    raise RuntimeError("the daemon never waited on the stopped sshfs")
                time.sleep(0.01)
        seconds = cat(m.model(SMALL))
        if hung.poll() is not None:
            raise RuntimeError(f"the stalled lookup ended before the measured read did ({fault}): not measured")
        return {"ms": 1000 * seconds}
    finally:
        if fault == "router" and b.router is not None:
            b.router.control(hang=None, models=None)
        if fault == "shared" and b.sshfs_mount is not None and b.sshfs_mount.stopped:
            b.sshfs_mount.cont()
        if hung is not None:
            try:
                hung.wait(timeout=30)
            except subprocess.TimeoutExpired:
                hung.kill()
                hung.wait()
        m.stop()


def case_hung(b: Bench) -> None:
    faults = []
    if b.router is None:
        b.note("hung lookup beside a stalled router: skipped (needs the test router, not --server nginx)")
    else:
        faults.append(("router", "a stalled router HEAD"))
    reason = sshfs_available()
    if reason is None:
        try:
            ensure_sshfs(b)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
    if reason is None:
        faults.append(("shared", "a hung shared dir (sshfs SIGSTOP)"))
    else:
        b.note(f"hung lookup beside a hung shared dir: skipped ({reason})")
    for fault, what in faults:
        mine, daemon, plain = interleave(b, [partial(beside_hung_lookup, b, BASE, fault),
                                             partial(beside_hung_lookup, b, DAEMON, fault),
                                             partial(beside_hung_lookup, b, None, fault)], b.reps)
        b.note(f"lookup + read of a small local model beside a lookup waiting on {what}: passthrough "
               f"{spread(mine['ms'], '{:.1f}')} ms, daemon path {spread(daemon['ms'], '{:.1f}')} ms; `cat` of the "
               f"backing file {spread(plain['ms'], '{:.1f}')} ms")
        m, d = median(mine["ms"]), median(daemon["ms"])
        b.rows.append(Row(f"lookup + read of a local model beside {what}", f"{m:.1f} ms",
                          f"{median(plain['ms']):.1f} ms", None, "≤ 100 ms", m <= 100 and d <= 100,
                          daemon=f"{d:.1f} ms"))


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
    sizes = ", ".join(f"{b.size / MIB:.0f} MiB" for b in results)
    subtitle = f"{sizes}, {args.reps} rep(s), kernel {platform.release()}"
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
