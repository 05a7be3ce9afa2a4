"""Operations through a real mount: `modelfs status`, `modelfs prefetch`, the progress xattr and the store quota."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

MB = 1 << 20


def modelfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelfs", *args], capture_output=True, text=True, timeout=timeout)


def test_status_shows_every_source_and_the_daemons_view(mount, router, dirs, tmp_path):
    r = router()
    write_model(dirs["store"], "local", b"GGUF-local")
    write_model(dirs["shared"], "shared", b"GGUF-shared")
    write_model(r.models_dir, "org/remote", gguf_bytes(MB))
    m = mount("--shared", str(dirs["shared"]), "--shared", str(tmp_path / "gone"), "--router", r.url)
    result = modelfs("status", str(m.path), "--json")
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    models = {model["name"]: model for model in state["models"]}
    assert models["local"]["source"] == "local" and models["local"]["state"] == "complete"
    assert models["shared"]["source"] == "shared" and models["shared"]["path"].startswith(str(dirs["shared"]))
    assert models["org/remote"]["source"] == "router" and models["org/remote"]["state"] == "not downloaded"
    assert models["org/remote"]["size"] == MB
    assert state["store"]["path"] == str(dirs["store"])
    assert [s["path"] for s in state["shared"]] == [str(dirs["shared"]), str(tmp_path / "gone")]
    assert state["routers"][0]["url"] == r.url
    shared = json.loads(os.getxattr(m.path, "user.modelfs.shared"))
    assert [s["available"] for s in shared] == [True, False]  # the missing directory is marked down
    assert int(os.getxattr(m.path, "user.modelfs.store_usage")) > 0
    assert json.loads(os.getxattr(m.path, "user.modelfs.routers"))[0]["url"] == r.url
    assert os.getxattr(m.path, "user.modelfs.version").decode()
    m.model("org/remote").read_bytes()
    wait_for((dirs["store"] / "org" / "remote" / "model.gguf").exists, what="download")
    state = json.loads(modelfs("status", str(m.path), "--json").stdout)
    assert {model["name"]: model["source"] for model in state["models"]}["org/remote"] == "local"
    human = modelfs("status", str(m.path))
    assert human.returncode == 0 and "org/remote" in human.stdout and str(dirs["store"]) in human.stdout
    assert modelfs("status", str(tmp_path)).returncode == 1  # not a modelfs mount: a clear error


def test_progress_xattr_while_downloading(mount, router):
    r = router()
    write_model(r.models_dir, "slow", gguf_bytes(4 * MB))
    r.control(rate=2 * MB)
    m = mount("--router", r.url)
    with open(m.model("slow"), "rb") as f:
        f.read(4)
        state = os.getxattr(m.model("slow"), "user.modelfs.progress").decode()
        assert state.startswith("downloading ") and f"/{4 * MB} bytes)" in state and "MB/s" in state
        status = json.loads(os.getxattr(m.path, "user.modelfs.status"))
        assert status["downloads"]["slow"]["total"] == 4 * MB
        assert status["open"] == {"slow": 1}


def test_prefetch_joins_the_download_and_waits_for_it(mount, router, dirs):
    r = router()
    data = gguf_bytes(3 * MB)
    write_model(r.models_dir, "org/pre", data)
    r.control(rate=6 * MB)
    m = mount("--router", r.url)
    reader = subprocess.Popen(["cat", str(m.model("org/pre"))], stdout=subprocess.PIPE)
    result = modelfs("prefetch", "org/pre", "--mount", str(m.path))
    assert result.returncode == 0, result.stderr
    assert (dirs["store"] / "org" / "pre" / "model.gguf").read_bytes() == data  # complete when prefetch returns
    assert reader.communicate(timeout=30)[0] == data
    assert r.blob_gets("org/pre") == 1


def test_prefetch_failures_are_clear_and_nonzero(mount, router):
    r = router()
    write_model(r.models_dir, "broken", gguf_bytes(MB))
    m = mount("--router", r.url, "--retries", "0")
    m.expected_errors += ["broken"]
    missing = modelfs("prefetch", "nowhere", "--mount", str(m.path))
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "No such file" in missing.stderr
    os.stat(m.model("broken"))
    r.control(status=500)
    failed = modelfs("prefetch", "broken", "--mount", str(m.path))
    assert failed.returncode == 1 and "Input/output error" in failed.stderr and "500" in failed.stderr
    invalid = modelfs("prefetch", "../etc/passwd", "--mount", str(m.path))
    assert invalid.returncode == 1 and "invalid model name" in invalid.stderr


def test_store_quota_evicts_least_recently_used_downloads_only(mount, router, dirs):
    r = router()
    for name in ("a", "b", "c", "d"):
        write_model(r.models_dir, name, gguf_bytes(2 * MB))
    write_model(dirs["store"], "by-hand", gguf_bytes(MB))  # an admin's file: never evicted
    m = mount("--router", r.url, "--store-max-size", "6M")
    m.expected_errors += ["cannot download d"]
    final = {name: dirs["store"] / name / "model.gguf" for name in "abcd"}
    for name in ("a", "b"):
        m.model(name).read_bytes()
        wait_for(final[name].exists, what=f"{name} downloaded")
        time.sleep(0.05)
    m.model("a").read_bytes()  # a is now more recently used than b
    with open(m.model("a"), "rb"):
        m.model("c").read_bytes()  # 1 + 2 + 2 + 2 > 6 MiB: b, the least recently used, goes
        wait_for(final["c"].exists, what="c downloaded")
        assert not final["b"].exists() and final["a"].exists()
        assert (dirs["store"] / "by-hand" / "model.gguf").exists()
        assert "evicted b" in m.log_text()
        # a is open and c in use by nobody but the only other download; d cannot fit without evicting a.
        with open(m.model("c"), "rb"):
            with pytest.raises(OSError) as info:
                open(m.model("d"), "rb")
            assert info.value.errno == errno.ENOSPC
    assert "quota" in m.log_text()
    assert final["a"].exists() and final["c"].exists()


def test_the_tools_read_the_daemons_state_as_json(mount, router, dirs):
    """`user.modelfs.state` is JSON through a download's life, `modelfs status --json` carries the same fields, and
    `prefetch` reports a failure from its errno and reason, never from parsing the progress text."""
    r = router()
    write_model(r.models_dir, "slow", gguf_bytes(4 * MB))
    write_model(r.models_dir, "broken", gguf_bytes(MB))
    write_model(dirs["store"], "here", b"GGUF-local")
    m = mount("--router", r.url, "--retries", "0")
    m.expected_errors += ["broken"]

    def state(name: str) -> dict[str, object]:
        return json.loads(os.getxattr(m.model(name), "user.modelfs.state"))

    assert state("here") == {"state": "complete"}
    assert state("slow") == {"state": "not downloaded", "total": 4 * MB}
    r.control(rate=2 * MB, models=["slow"])
    with open(m.model("slow"), "rb") as f:
        f.read(4)
        now = state("slow")
        assert now["state"] == "downloading" and now["total"] == 4 * MB, now
        assert 0 < now["bytes"] <= 4 * MB and now["rate"] >= 0 and isinstance(now["parts"], list)
        listed = json.loads(modelfs("status", str(m.path), "--json").stdout)["models"]
        models = {model["name"]: model for model in listed}
        assert models["slow"]["state"] == "downloading" and models["slow"]["total"] == 4 * MB
        assert models["here"]["state"] == "complete"
        assert "downloading" in modelfs("status", str(m.path)).stdout
    wait_for(lambda: state("slow") == {"state": "complete"}, what="the download promoted")
    r.control(status=500, models=["broken"])
    failed = modelfs("prefetch", "broken", "--mount", str(m.path))
    assert failed.returncode == 1 and "Input/output error (" in failed.stderr and "500" in failed.stderr, failed.stderr
    broken = state("broken")
    assert broken["state"] == "failed" and broken["errno"] == errno.EIO and "500" in str(broken["reason"])
    assert json.loads(os.getxattr(m.path, "user.modelfs.status"))["failures"]["broken"]["errno"] == errno.EIO
