"""The soak of tests/soak.py, short: real reader processes verify every byte of local, shared (sshfs, stopped and
continued) and router models (500s, stalls, resets in bursts); none may see a wrong byte or hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.sshfs import sshfs_available

ROOT = Path(__file__).resolve().parent.parent
_REASON = sshfs_available()


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
@pytest.mark.timeout(240)
def test_quick_soak_under_faults(tmp_path):
    report_file = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "-m", "tests.soak", "--quick", "--json", str(report_file), "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert report_file.exists(), result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["wrong_bytes"] == 0, report["wrong_reads"]
    assert report["hung"] == 0, report
    assert report["readers"] >= 16 and sum(report["models"].values()) >= 20
    assert report["bytes_read"] > 100 << 20
    metrics = report["metrics"]
    for source in ("local", "shared", "router"):
        assert metrics[f"modelfs_opens_total{{source={source}}}"] > 0, source
    assert metrics["modelfs_router_requests_total{status=5xx}"] > 0  # the faults did happen
    assert sum(v for k, v in metrics.items() if k.startswith("modelfs_shared_outages_total")) > 0
    for name, downloads in report["downloads"].items():
        assert downloads["started"] <= 1 + downloads["failed"], (name, downloads)
    rss = [mib for _, mib in report["rss_mib"]]
    assert max(rss) < 150, rss
    assert report["daemon_tracebacks"] == 0
    assert result.returncode == 0, result.stdout[-3000:]
