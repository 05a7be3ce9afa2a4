"""Bench cases that download a model cold: `fetch` (the test router, one stream), `nginx` (Range, streams, a
rate limit), `load` (GGUFReader on a cold model), `readers` (many readers of one cold model) and `rss` (the
daemon's peak memory while it streams). Each against curl -o of the same URL, or against the target alone.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.core import BASE, REMOTE, Bench, Lever, Result, cat, interleave, probe, ratio_row, wait_promoted
from bench.harness import (
    MIB,
    Nginx,
    RouterProcess,
    RssSampler,
    cpu_seconds,
    make_gguf_of_size,
    median,
    prefault,
    rmtree,
    spread,
    start_router,
    timed,
)
from bench.report import Row

# Cases. Each modelfs measurement starts its own daemon unless the case says otherwise; every run makes the
# files it assumes cached fully cached right before it is timed, after pre-faulting the memory it will fill.


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
