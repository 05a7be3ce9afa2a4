"""FUSE passthrough: the mode a mount ends up in, and why, on a real mount; the mode logic by itself."""

from __future__ import annotations

import json
import os

import pytest
from conftest import gguf_bytes, write_model

from modelfs import passthrough
from modelfs.config import ConfigError, load


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
