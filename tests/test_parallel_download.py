"""Parallel ranged downloads through a real mount: a real nginx (Range natively, a per-connection limit) and the
test router in both flavours. Parts are 1 MiB and models a few MiB, so every case has several parts in flight."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from modelfs.ranges import RangeSet
from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

MB = 1 << 20
PARTS = {"MODELFS_DOWNLOAD_STREAMS": "4", "MODELFS_DOWNLOAD_PART_SIZE": "1M"}

pytestmark = pytest.mark.timeout(60)


def gets(r, name: str) -> list[dict]:
    return [q for q in r.stats()["requests"] if q["method"] == "GET" and q["name"] == name]


def asked(request: dict, size: int) -> tuple[int, int]:
    """The byte range [start, end) a request asked for (its Range header; none: the whole file)."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", request["range"] or f"bytes=0-{size - 1}")
    assert match, request
    return int(match.group(1)), int(match.group(2)) + 1 if match.group(2) else size


def recorded(sidecar: Path) -> RangeSet:
    """The ranges the resume record claims are on disk."""
    try:
        return RangeSet(map(tuple, json.loads(sidecar.read_text()).get("ranges", [])))
    except (OSError, ValueError):
        return RangeSet()


def test_nginx_with_a_per_connection_limit_gets_parallel_parts(mount, nginx, tmp_path, dirs):
    models = tmp_path / "models"
    data = gguf_bytes(6 * MB)
    write_model(models, "wide", data)
    server = nginx(models_dir=models, limit_rate="512k")  # a 1 s burst per request, then 512 KB/s
    m = mount("--router", server.url, env=PARTS)
    with open(m.model("wide"), "rb") as f:
        assert f.read(4) == b"GGUF"
        seen: set[str] = set()  # status shows the parts in flight (polled: a loaded machine may be slow to ask)
        while "wide" in (downloads := json.loads(os.getxattr(m.path, "user.modelfs.status"))["downloads"]):
            if len(downloads["wide"]["parts"]) > 1:
                seen.add(os.getxattr(m.model("wide"), "user.modelfs.progress").decode())
        assert any("parts in flight" in state for state in seen), seen
        assert b"GGUF" + f.read() == data
    wait_for((dirs["store"] / "wide" / "model.gguf").exists, what="promotion")
    assert (dirs["store"] / "wide" / "model.gguf").read_bytes() == data
    lines = [line for line in server.log_lines("/v0/models/blob/wide") if line.startswith("GET ")]
    assert len(lines) >= 6 and all(" 206 " in line for line in lines), lines
    ranges = [asked({"range": line.split("range=")[1].split()[0]}, len(data)) for line in lines]
    assert all(end - start <= MB for start, end in ranges)  # bounded parts
    sent = sum(int(line.rpartition("body=")[2]) for line in lines)
    assert len(data) <= sent <= 1.02 * len(data)  # no part fetched twice


def test_llmlb_router_without_range_gets_exactly_one_get(mount, router, dirs):
    r = router("llmlb")
    data = gguf_bytes(4 * MB)
    write_model(r.models_dir, "single", data)
    m = mount("--router", r.url, env=PARTS)
    assert m.model("single").read_bytes() == data
    wait_for((dirs["store"] / "single" / "model.gguf").exists, what="promotion")
    assert r.blob_gets("single") == 1 and r.bytes_sent("single") == len(data)
    assert gets(r, "single")[0]["status"] == 200


def test_readers_at_the_start_and_at_the_end_are_served_early(mount, router, dirs):
    r = router("range")
    data = gguf_bytes(16 * MB)
    write_model(r.models_dir, "ends", data)
    r.control(rate=2 * MB)  # per connection: about 2 s with 4 streams
    m = mount("--router", r.url, env=PARTS)
    final = dirs["store"] / "ends" / "model.gguf"
    with open(m.model("ends"), "rb") as tail, open(m.model("ends"), "rb") as head:
        tail.seek(len(data) - 4096)
        assert tail.read(4096) == data[-4096:]
        assert head.read(MB) == data[:MB]
        assert not final.exists() and r.bytes_sent("ends") < len(data) // 2
    starts = sorted(asked(q, len(data))[0] for q in gets(r, "ends"))
    assert len(data) - MB in starts  # the reader at the end got a part of its own, not the lowest one left
    r.control(rate=None)
    wait_for(final.exists, what="promotion")
    assert final.read_bytes() == data


def test_kill9_then_resume_fetches_only_the_missing_ranges(mount, router, dirs):
    r = router("range")
    data = gguf_bytes(12 * MB)
    origin = write_model(r.models_dir, "resume", data)
    r.control(rate=MB // 2)  # per connection: about 6 s with 4 streams
    m = mount("--router", r.url, env=PARTS)
    reader = subprocess.Popen(["cat", str(m.model("resume"))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = dirs["store"] / "resume" / ".model.gguf.partial.json"
    wait_for(lambda: recorded(sidecar).size >= 3 * MB, what="3 MiB recorded", timeout=20)
    m.kill9()
    reader.wait(timeout=10)
    assert not (dirs["store"] / "resume" / "model.gguf").exists(), "finished before the kill: machine too slow"
    kept = recorded(sidecar)
    r.reset()  # count the second run only
    m2 = mount("--router", r.url, env=PARTS)
    assert subprocess.run(["cmp", str(m2.model("resume")), str(origin)]).returncode == 0
    wait_for((dirs["store"] / "resume" / "model.gguf").exists, what="promotion")
    second = gets(r, "resume")
    assert second and all(q["status"] == 206 and q["if_range"] for q in second)
    for q in second:  # every request asked only for bytes the record did not claim
        start, end = asked(q, len(data))
        assert RangeSet(kept.gaps(start, end)).covers(start, end), (q, kept)
    assert sum(q["bytes_sent"] for q in second) == len(data) - kept.size
    assert "resuming download of resume" in m2.log_text()


def test_one_failing_part_is_retried_without_restarting_the_others(mount, router, dirs):
    r = router("range")
    data = gguf_bytes(4 * MB)
    write_model(r.models_dir, "flaky", data)
    r.control(rate=2 * MB, truncate_after=300_000, truncate_times=1)  # one part's body breaks off once
    m = mount("--router", r.url, env=PARTS)
    assert m.model("flaky").read_bytes() == data
    wait_for((dirs["store"] / "flaky" / "model.gguf").exists, what="promotion")
    requests = gets(r, "flaky")
    assert len(requests) == 5  # four parts, and the rest of the broken one
    assert r.bytes_sent("flaky") == len(data)  # nothing fetched twice
    assert "retrying" in m.log_text()


def test_parts_failing_every_time_give_eio_and_nothing_promoted(mount, router, dirs):
    r = router("range")
    data = gguf_bytes(4 * MB)
    write_model(r.models_dir, "dead", data)
    r.control(truncate_after=200_000)  # every body breaks off
    m = mount("--router", r.url, "--retries", "1", env=PARTS)
    m.expected_errors.append("download of dead failed")
    with pytest.raises(OSError) as info:
        m.model("dead").read_bytes()
    assert info.value.errno == 5
    assert "gave up after 2 tries" in m.log_text()
    assert not (dirs["store"] / "dead" / "model.gguf").exists()
    r.control(truncate_after=None)
    assert m.model("dead").read_bytes() == data


def test_a_new_version_between_runs_starts_over(mount, router, dirs):
    r = router("range")
    old = gguf_bytes(8 * MB)
    origin = write_model(r.models_dir, "versioned", old)
    r.control(rate=MB // 2)  # per connection: about 4 s with 4 streams
    m = mount("--router", r.url, env=PARTS)
    reader = subprocess.Popen(["cat", str(m.model("versioned"))], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    sidecar = dirs["store"] / "versioned" / ".model.gguf.partial.json"
    wait_for(lambda: recorded(sidecar).size >= 2 * MB, what="2 MiB recorded", timeout=20)
    m.kill9()
    reader.wait(timeout=10)
    assert not (dirs["store"] / "versioned" / "model.gguf").exists(), "finished before the kill: machine too slow"
    new = gguf_bytes(8 * MB, seed=7)
    origin.write_bytes(new)  # same size, new mtime: a new ETag
    r.reset()
    m2 = mount("--router", r.url, env=PARTS)
    assert m2.model("versioned").read_bytes() == new
    wait_for((dirs["store"] / "versioned" / "model.gguf").exists, what="promotion")
    assert (dirs["store"] / "versioned" / "model.gguf").read_bytes() == new
    first = gets(r, "versioned")[0]
    assert first["if_range"] and first["status"] == 200  # If-Range failed: the whole new file
    assert "starting over from byte 0" in m2.log_text()


def test_parts_share_kept_alive_connections(mount, router, dirs):
    """Each part's body is read to its end, so its connection carries the next part: a download opens about one
    connection per stream, not one per part."""
    r = router("range")
    data = gguf_bytes(16 * MB)
    write_model(r.models_dir, "reuse", data)
    m = mount("--router", r.url, env=PARTS)
    assert os.stat(m.model("reuse")).st_size == len(data)  # the list and HEAD first: not the download's
    r.reset()
    r.control(rate=3 * MB)  # per connection: more streams pay, and each carries several 1 MiB parts
    assert m.model("reuse").read_bytes() == data
    wait_for((dirs["store"] / "reuse" / "model.gguf").exists, what="promotion")
    requests = gets(r, "reuse")
    assert len(requests) >= 16 and all(q["status"] == 206 for q in requests)
    opened = int(re.search(r"downloaded reuse: .* (\d+) connection\(s\)", m.log_text()).group(1))
    assert 2 <= opened <= 4, m.log_text()  # it grew past one stream, never past download_streams, one each
    assert r.connections() <= opened + 1  # + a refresh of the model list, if one fell in (metadata: httpx)
    assert r.bytes_sent("reuse") == len(data)
