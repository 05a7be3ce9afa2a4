"""FUSE passthrough: the mode a mount ends up in, and why, on a real mount; the mode logic by itself."""

from __future__ import annotations

import json
import os

import pytest

from modelfs import passthrough
from modelfs.config import ConfigError, load
from tests.support.models import gguf_bytes, write_model


def mode_of(root: os.PathLike[str]) -> dict[str, object]:
    return json.loads(os.getxattr(root, "user.modelfs.passthrough"))


def test_default_mount_uses_passthrough_on_this_machine(mount, dirs):
    """CI is root on a kernel with passthrough and installs the patched library: `auto` must end up active here,
    never silently on the daemon path."""
    data = gguf_bytes(1 << 20)
    write_model(dirs["store"], "m", data)
    m = mount()
    assert mode_of(m.path) == {"mode": "auto", "active": True, "reason": "kernel, privileges and library allow it"}
    assert "passthrough active (mode auto)" in m.log_text()
    with open(m.model("m"), "rb") as f:
        assert os.getxattr(m.model("m"), "user.modelfs.io") == b"passthrough"
        assert f.read() == data
    status = json.loads(os.getxattr(m.path, "user.modelfs.status"))
    assert status["passthrough"]["active"] is True


def test_passthrough_off_serves_reads_from_the_daemon(mount, dirs):
    data = gguf_bytes(1 << 20)
    write_model(dirs["store"], "m", data)
    m = mount("--passthrough", "off")
    assert mode_of(m.path) == {"mode": "off", "active": False, "reason": "off by configuration"}
    assert "passthrough inactive, daemon read path (mode off): off by configuration" in m.log_text()
    with open(m.model("m"), "rb") as f:
        assert os.getxattr(m.model("m"), "user.modelfs.io") == b"daemon"
        assert f.read() == data


def test_on_refuses_to_start_without_the_library_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(passthrough, "library_supports", lambda: False)
    with pytest.raises(passthrough.PassthroughUnavailable, match="no passthrough support"):
        passthrough.Passthrough("on").check()
    auto = passthrough.Passthrough("auto")
    auto.check()
    assert not auto.wanted and "no passthrough support" in auto.reason


def test_on_refuses_to_start_without_cap_sys_admin(monkeypatch):
    monkeypatch.setattr(passthrough, "has_cap_sys_admin", lambda: False)
    with pytest.raises(passthrough.PassthroughUnavailable, match="CAP_SYS_ADMIN"):
        passthrough.Passthrough("on").check()


def test_passthrough_setting_is_validated():
    assert load({"passthrough": "ON"}, env={}).passthrough == "on"
    assert load(env={"MODELFS_PASSTHROUGH": "off"}).passthrough == "off"
    assert load(env={}).passthrough == "auto"
    with pytest.raises(ConfigError, match="'passthrough': expected auto, on or off"):
        load({"passthrough": "sometimes"}, env={})


def test_kernel_allows_256_background_requests(mount):
    """The FUSE_INIT reply raises the kernel's limit of background requests (fs.MAX_BACKGROUND): with the default
    of 12, reads waiting on a stopped share hold every slot (docs/performance.md, soak)."""
    import subprocess

    from modelfs.fs import MAX_BACKGROUND

    m = mount()
    connections = "/sys/fs/fuse/connections"
    ours = subprocess.run(["mountpoint", "-q", connections]).returncode != 0
    if ours:
        subprocess.run(["mount", "-t", "fusectl", "none", connections], check=True)
    try:
        dev = os.stat(m.path).st_dev
        conn = f"{connections}/{os.minor(dev)}"
        with open(f"{conn}/max_background") as f:
            assert int(f.read()) == MAX_BACKGROUND == 256
        with open(f"{conn}/congestion_threshold") as f:
            assert int(f.read()) == 192
    finally:
        if ours:
            subprocess.run(["umount", connections], check=True)


def scrape_fallbacks(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["cause"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "modelfs_passthrough_fallbacks_total"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_backing_open_failing_for_one_file_falls_back_for_that_open_only(mount, dirs):
    """EMFILE, ENOMEM and the like say nothing about the filesystem: the daemon serves that one open, says so in
    `user.modelfs.io` and the log (WARNING) and the metric, and the next open (of it or any other file) is passed
    through again. The failure is injected into the kernel call (MODELFS_TEST_BACKING_OPEN_ERRNOS)."""
    a, b = gguf_bytes(1 << 20, seed=1), gguf_bytes(1 << 20, seed=2)
    write_model(dirs["store"], "a", a)
    write_model(dirs["store"], "b", b)
    port = free_port()
    m = mount("--passthrough", "on", "--metrics", f"127.0.0.1:{port}",
              env={"MODELFS_TEST_BACKING_OPEN_ERRNOS": "EMFILE"})
    with open(m.model("a"), "rb") as f:
        assert os.getxattr(m.model("a"), "user.modelfs.io") == b"daemon (backing open failed: EMFILE)"
        assert f.read() == a
        with open(m.model("b"), "rb") as g:  # the same filesystem: passthrough is still on for it
            assert os.getxattr(m.model("b"), "user.modelfs.io") == b"passthrough"
            assert g.read() == b
    with open(m.model("a"), "rb") as f:
        assert os.getxattr(m.model("a"), "user.modelfs.io") == b"passthrough"
        assert f.read() == a
    warnings = [line for line in m.log_text().splitlines() if " WARNING " in line and "passthrough" in line]
    assert len(warnings) == 1 and "Too many open files" in warnings[0] and "stays on" in warnings[0], warnings
    fallbacks = scrape_fallbacks(port)
    assert fallbacks["EMFILE"] == 1 and sum(fallbacks.values()) == 1, fallbacks


def test_a_backing_open_refused_for_the_filesystem_sends_its_files_to_the_daemon(mount, dirs):
    """ELOOP (filesystems stacked too deep) is about the backing filesystem: every file there takes the daemon
    path for the rest of the mount, and says why."""
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_model(dirs["store"], name, gguf_bytes(1 << 20, seed=seed))
    port = free_port()
    m = mount("--passthrough", "on", "--metrics", f"127.0.0.1:{port}",
              env={"MODELFS_TEST_BACKING_OPEN_ERRNOS": "ELOOP"})
    refused = b"daemon (backing files refused: ELOOP)"
    for name, seed in (("a", 1), ("b", 2)):
        with open(m.model(name), "rb") as f:
            assert os.getxattr(m.model(name), "user.modelfs.io") == refused
            assert f.read() == gguf_bytes(1 << 20, seed=seed)
    assert os.getxattr(m.model("c"), "user.modelfs.io") == refused  # not open: how its next open would be served
    assert scrape_fallbacks(port)["ELOOP"] == 2
    assert "for the rest of the mount" in m.log_text()
