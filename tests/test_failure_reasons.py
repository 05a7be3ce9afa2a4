"""Why a download ended without a model, as a reason from a fixed set (errors.Reason): through a real mount, each
failure is counted under its reason in the metrics and shown with it in the status, whatever its message says."""

from __future__ import annotations

import errno
import json
import os

import pytest

from modelfs.errors import Reason
from tests.support.models import gguf_bytes, write_model
from tests.support.procs import free_port, wait_for
from tests.test_metrics import scrape

MB = 1 << 20


def failed(port: int) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in scrape(port).items()
            if name == "modelfs_downloads_failed_total"}


def test_each_failure_is_counted_and_shown_under_its_reason(mount, router, dirs):
    r = router()
    data = gguf_bytes(6 * MB)
    write_model(r.models_dir, "gone", gguf_bytes(MB))
    write_model(r.models_dir, "liar", b"<html>not a model</html>" * 1000)
    write_model(r.models_dir, "broken", gguf_bytes(MB))
    moving = write_model(r.models_dir, "moving", data)
    port = free_port()
    m = mount("--router", r.url, "--retries", "1", "--metrics", f"127.0.0.1:{port}")
    m.expected_errors += ["not GGUF", "broken", "changed on the server"]
    assert set(failed(port)) == {reason.value for reason in Reason}  # every label exists from the start
    for name in ("gone", "liar", "broken", "moving"):
        os.stat(m.model(name))  # known to the mount before the router turns against it

    r.control(status=404, models=["gone"])  # listed, then gone when fetched
    with pytest.raises(FileNotFoundError):
        m.model("gone").read_bytes()
    with pytest.raises(OSError) as info:
        m.model("liar").read_bytes()
    assert info.value.errno == errno.EIO
    r.control(status=500, models=["broken"])
    with pytest.raises(OSError) as info:
        m.model("broken").read_bytes()
    assert info.value.errno == errno.EIO
    # llmlb sends no validator: a body broken off is fetched again from byte 0, and if the file changed between
    # the two, a reader of the first bytes must not get the new ones.
    r.control(status=None, models=["moving"], truncate_after=3 * MB, truncate_times=1, rate=6 * MB)
    with open(m.model("moving"), "rb") as f:
        assert f.read(MB) == data[:MB]
        moving.write_bytes(gguf_bytes(6 * MB, seed=9))
        with pytest.raises(OSError):
            while f.read(MB):
                pass

    expected = {"not_found": 1, "corrupt": 1, "error": 1, "changed": 1, "store_full": 0, "unmount": 0}
    wait_for(lambda: failed(port) == expected, what=f"failures counted as {expected}")
    status = json.loads(os.getxattr(m.path, "user.modelfs.status"))
    causes = {name: failure["cause"] for name, failure in status["failures"].items()}
    assert causes == {"gone": "not_found", "liar": "corrupt", "broken": "error", "moving": "changed"}
    assert status["failures"]["gone"]["errno"] == errno.ENOENT
    assert "HTTP 500" in status["failures"]["broken"]["reason"]  # the words, for people
    state = json.loads(os.getxattr(m.model("liar"), "user.modelfs.state"))
    assert state["state"] == "failed" and state["cause"] == "corrupt"
