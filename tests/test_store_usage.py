"""Store work off the trio loop: the usage count (one walk at mount start, then kept current), evictions in a worker
thread, and root xattrs that build only the value asked for. Unit tests of the count with real files first, then a
real mount with 10,000 models in the store, where a FUSE request must never wait for the store's walks."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from modelfs.errors import Failure
from modelfs.store import DOWNLOADED, Store
from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

MB = 1 << 20


def downloaded(root: Path, name: str, size: int, used: float) -> None:
    """A model modelfs downloaded (so evictable), last used at `used`."""
    write_model(root, name, b"GGUF" + b"\0" * (size - 4))
    marker = root / name / DOWNLOADED
    marker.touch()
    os.utime(marker, (used, used))


class Downloading:
    """What the count reads of a download in progress: the bytes on disk."""

    def __init__(self, progress: int) -> None:
        self.progress = progress


class Registry:
    def __init__(self) -> None:
        self.downloads: dict[str, Downloading] = {}


def quota_run(test: object, store: Store, limit: int | None, registry: Registry) -> None:
    from modelfs.quota import Quota

    async def main() -> None:
        quota = Quota(store, limit, registry)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(quota.run)
            await test(quota)  # type: ignore[operator]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_count_follows_downloads_and_evictions_without_walking_again(tmp_path):
    store = Store(tmp_path)
    now = time.time()
    downloaded(tmp_path, "old", MB, now - 300)
    downloaded(tmp_path, "mid", MB, now - 200)
    downloaded(tmp_path, "new", MB, now - 100)
    write_model(tmp_path, "by-hand", b"GGUF" + b"\0" * (MB - 4))
    registry = Registry()

    async def test(quota: Any) -> None:
        assert await quota.counted() == store.usage() == 4 * MB
        # A download of 2 MiB under a 5 MiB quota: the least recently used models go, never the one placed by hand.
        await quota.reserve("fresh", 2 * MB, busy=set())
        assert not (tmp_path / "old" / "model.gguf").exists() and (tmp_path / "mid" / "model.gguf").exists()
        registry.downloads["fresh"] = Downloading(0)
        assert quota.usage() == 3 * MB
        partial = tmp_path / "fresh" / ".model.gguf.partial"
        partial.parent.mkdir()
        partial.write_bytes(b"GGUF" + b"\1" * (MB - 4))
        registry.downloads["fresh"].progress = MB
        assert quota.usage() == 4 * MB  # a download's bytes count as it writes them
        # ...and it ends: promoted (a rename), no longer running; the count now stats its files, once.
        os.replace(partial, tmp_path / "fresh" / "model.gguf")
        (tmp_path / "fresh" / "model.gguf").write_bytes(b"GGUF" + b"\1" * (2 * MB - 4))
        del registry.downloads["fresh"]
        assert quota.usage() == store.usage() == 5 * MB
        # No room for 3 MiB more while `mid` and `new` are in use: ENOSPC, and nothing was evicted.
        with pytest.raises(Failure) as info:
            await quota.reserve("huge", 3 * MB, busy={"mid", "new"})
        assert info.value.errno == errno.ENOSPC
        assert quota.usage() == store.usage() == 5 * MB

    quota_run(test, store, 5 * MB, registry)


def test_two_downloads_never_count_on_the_same_free_space(tmp_path):
    store = Store(tmp_path)
    downloaded(tmp_path, "old", MB, time.time() - 100)
    registry = Registry()

    async def test(quota: Any) -> None:
        await quota.reserve("a", 2 * MB, busy=set())  # fits beside `old` in 3 MiB
        registry.downloads["a"] = Downloading(0)  # nothing written yet, but its size is taken
        assert (tmp_path / "old" / "model.gguf").exists()
        await quota.reserve("b", MB, busy=set())  # 1 + 2 + 1 > 3: `old` must go now
        assert not (tmp_path / "old" / "model.gguf").exists()

    quota_run(test, store, 3 * MB, registry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_bytes(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "modelfs_store_bytes")


#: Runs in a child: asks the daemon for one file's xattr every 5 ms for argv[2] seconds; prints the latencies.
_PROBE = r"""
import json, os, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
latencies, errors, slow = [], 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    start = time.monotonic()
    try:
        os.getxattr(path, "user.modelfs.source")  # never cached by the kernel: each one reaches the daemon
    except OSError:
        errors += 1
    latencies.append(time.monotonic() - start)
    if latencies[-1] > 0.05:
        slow.append([round(start, 3), round(latencies[-1], 3)])
    time.sleep(0.005)
print(json.dumps({"latencies": latencies, "errors": errors, "slow": slow}))
"""


def grow(root: Path, count: int) -> None:
    """`count` tiny downloaded models (evictable) in 100 prefixes."""
    for i in range(count):
        directory = root / f"org{i % 100}" / f"m{i}"
        directory.mkdir(parents=True)
        (directory / "model.gguf").write_bytes(b"GGUF" + b"x" * 60)
        (directory / DOWNLOADED).touch()


def test_store_work_at_10k_models_holds_no_request(mount, router, dirs):
    """10,000 models in the store, a quota a download must evict about a thousand of them for, the status asked
    for again and again and the metrics scraped: a request for another file is answered meanwhile as fast as
    ever. (Before, the store's walks ran on the trio loop: about 0.5 s per eviction and 0.2 s per status here.)"""
    grow(dirs["store"], 10_000)
    write_model(dirs["store"], "probe", b"GGUF-a model placed by hand: never evicted")
    r = router()
    data = gguf_bytes(8 * MB)
    write_model(r.models_dir, "big", data)
    port = free_port()
    usage = Store(dirs["store"]).usage()
    m = mount("--router", r.url, "--store-max-size", str(usage + 4 * MB), "--metrics", f"127.0.0.1:{port}")
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, str(m.model("probe")), "10"], stdout=subprocess.PIPE,
                             text=True)
    scrapes = []
    try:
        time.sleep(0.5)
        for _ in range(3):  # 2.1 s apart: the old code's usage cache (2 s) had expired each time
            started = time.monotonic()
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            scrapes.append(time.monotonic() - started)
            assert "modelfs_store_bytes" in page
            json.loads(os.getxattr(m.path, "user.modelfs.status"))
            time.sleep(2.1)
        assert m.model("big").read_bytes() == data  # evicts ~1,000 models first
        wait_for((dirs["store"] / "big" / "model.gguf").exists, what="the download promoted")
        for _ in range(3):
            json.loads(os.getxattr(m.path, "user.modelfs.status"))
            time.sleep(0.3)
        result = json.loads(probe.communicate(timeout=30)[0])
    finally:
        probe.kill()
    latencies = sorted(result["latencies"])
    slowest, p99 = latencies[-1], latencies[int(len(latencies) * 0.99)]
    print(f"\nrequests beside the store work: {len(latencies)}, p99 {p99 * 1e3:.1f} ms, slowest {slowest * 1e3:.1f} ms;"
          f" scrapes {', '.join(f'{s * 1e3:.1f}' for s in scrapes)} ms; slow ones (start, s): {result['slow']}")
    assert result["errors"] == 0
    assert slowest < 0.15, f"a request waited {slowest:.3f}s (p99 {p99:.3f}s)"
    assert max(scrapes) < 0.1, f"a scrape took {max(scrapes):.3f}s: it reads the daemon's state, not a snapshot"
    evicted = m.log_text().count("evicted org")
    assert 900 <= evicted <= 1100, evicted
    # The count kept up with the download and the evictions, without walking the store again; the metrics have it
    # within a second.
    usage = Store(dirs["store"]).usage()
    assert int(os.getxattr(m.path, "user.modelfs.store_usage")) == usage
    wait_for(lambda: store_bytes(port) == usage, 3, "the usage published to the metrics")


def test_one_root_xattr_builds_only_its_value(mount, router):
    """`getfattr -n user.modelfs.version /models` asks for one value: it must not list the root (which waits for
    the routers' first list) nor build the whole status."""
    r = router()
    r.control(list_hang=True)
    m = mount("--router", r.url)
    try:
        for name in ("version", "store_usage", "shared", "routers", "passthrough"):
            started = time.monotonic()
            assert os.getxattr(m.path, f"user.modelfs.{name}")
            assert time.monotonic() - started < 0.5, name
        started = time.monotonic()
        assert "user.modelfs.entries" in os.listxattr(m.path)
        assert time.monotonic() - started < 0.5
    finally:
        r.control(list_hang=None)
