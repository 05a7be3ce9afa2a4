"""Prometheus metrics of a real mount, scraped over HTTP and parsed with prometheus_client's own parser: the
values move as opens, misses, downloads and failures happen, and a port already in use stops the mount."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import free_port, wait_for

MB = 1 << 20


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the page: (name, sorted labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.io_paths
def test_metrics_move_with_real_opens_misses_and_downloads(io, mount, router, dirs):
    r = router()
    local, shared, remote = gguf_bytes(MB), gguf_bytes(2 * MB), gguf_bytes(3 * MB)
    write_model(dirs["store"], "loc", local)
    write_model(dirs["shared"], "sha", shared)
    write_model(r.models_dir, "org/rem", remote)
    write_model(r.models_dir, "broken", gguf_bytes(MB))
    port = free_port()
    m = mount("--shared", str(dirs["shared"]), "--router", r.url, "--retries", "0", "--store-max-size", "1G",
              "--metrics", f"127.0.0.1:{port}")
    m.expected_errors += ["broken"]
    before = scrape(port)
    assert before[("modelfs_opens_total", (("source", "local"),))] == 0
    assert before[("modelfs_downloads_failed_total", (("reason", "error"),))] == 0
    assert before[("modelfs_shared_available", (("dir", str(dirs["shared"])),))] == 1
    assert before[("modelfs_store_quota_bytes", ())] == 1 << 30

    assert m.model("loc").read_bytes() == local
    assert m.model("sha").read_bytes() == shared
    assert m.model("org/rem").read_bytes() == remote
    wait_for((dirs["store"] / "org" / "rem" / "model.gguf").exists, what="promotion")
    with pytest.raises(FileNotFoundError):
        open(m.model("nowhere"), "rb")
    r.control(status=500, models=["broken"])
    with pytest.raises(OSError):
        m.model("broken").read_bytes()

    def failed() -> bool:
        return scrape(port)[("modelfs_downloads_failed_total", (("reason", "error"),))] == 1

    wait_for(failed, what="the failed download counted")
    after = scrape(port)
    for source in ("local", "shared", "router"):
        assert after[("modelfs_opens_total", (("source", source),))] >= 1, source
    assert after[("modelfs_misses_total", ())] >= 1
    assert after[("modelfs_downloads_started_total", ())] == 2
    assert after[("modelfs_downloads_completed_total", ())] == 1
    assert after[("modelfs_download_bytes_total", ())] == len(remote)
    assert after[("modelfs_download_seconds_count", ())] == 2
    # A fresh mount. With passthrough the kernel reads the local and shared files itself; the download in
    # progress goes through the daemon either way. On the daemon path the local file's reads are answered in C
    # (patched pyfuse3, 0005), the shared file's in Python, and the download's in C from its partial file once
    # Python waited for the bytes (0006).
    python, in_c = after[("modelfs_daemon_read_bytes_total", ())], after[("modelfs_daemon_c_read_bytes_total", ())]
    ranged = after[("modelfs_daemon_range_read_bytes_total", ())]
    assert ranged > 0
    if io == "passthrough":
        assert after[("modelfs_passthrough_opens_total", ())] == 2
        assert len(remote) <= python + ranged < len(remote) + len(local)
        assert in_c == 0
    else:
        assert python >= len(shared)
        assert len(shared) + len(remote) <= python + ranged < len(local) + len(shared) + len(remote)
        assert in_c == len(local)
        assert after[("modelfs_passthrough_opens_total", ())] == 0
    assert after[("modelfs_router_requests_total", (("router", r.url), ("status", "2xx")))] >= 2
    assert after[("modelfs_router_requests_total", (("router", r.url), ("status", "5xx")))] >= 1
    # Store usage is a walk of the store, taken at most every 2 s.
    wait_for(lambda: scrape(port)[("modelfs_store_bytes", ())] >= len(local) + len(remote), what="store bytes")
    assert after[("modelfs_shared_outages_total", (("dir", str(dirs["shared"])),))] == 0
    assert after[("modelfs_evictions_total", ())] == 0


def test_shared_outage_shows_in_the_gauge(mount, dirs, tmp_path):
    port = free_port()
    gone = tmp_path / "gone"
    m = mount("--shared", str(gone), "--metrics", f"127.0.0.1:{port}")

    def down() -> bool:
        return scrape(port)[("modelfs_shared_available", (("dir", str(gone)),))] == 0

    wait_for(down, what="the missing shared directory marked down")
    assert scrape(port)[("modelfs_shared_outages_total", (("dir", str(gone)),))] == 1
    assert m.path.is_dir()


def test_metrics_port_in_use_is_a_clear_mount_error(dirs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(dirs["mnt"]), "--store",
                                 str(dirs["store"]), "--foreground", "--metrics", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(dirs["mnt"]), "--metrics", "nohost"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "metrics" in bad.stderr
