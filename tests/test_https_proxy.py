"""A router over HTTPS reached through a forward proxy, as a node behind a corporate proxy reaches it: a real
mount, a real nginx with TLS (a self-signed certificate the daemon trusts through SSL_CERT_FILE) and a real squid
that only relays CONNECT tunnels. Metadata (httpx) and model bodies (modelfs.transport) both go through it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for
from tests.support.squid import Squid

MB = 1 << 20


@pytest.fixture
def squid() -> Iterator[Squid]:
    if shutil.which("squid") is None:
        pytest.skip("squid not installed")
    with Squid.forward() as proxy:
        yield proxy


def self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (as an IP subject alternative name) and its key."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_router_through_a_connect_proxy(mount, nginx, squid, tmp_path, dirs):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    models = tmp_path / "models"
    data = gguf_bytes(5 * MB + 77)
    write_model(models, "secure", data)
    cert, key = self_signed(tmp_path)
    server = nginx(models_dir=models, tls=(cert, key))
    assert server.url.startswith("https://")
    env = {"HTTPS_PROXY": squid.url, "NO_PROXY": "", "SSL_CERT_FILE": str(cert),
           "MODELFS_DOWNLOAD_PART_SIZE": "1M", "MODELFS_DOWNLOAD_STREAMS": "4"}
    m = mount("--router", server.url, env=env)
    assert m.model("secure").read_bytes() == data
    wait_for((dirs["store"] / "secure" / "model.gguf").exists, what="promotion")
    assert (dirs["store"] / "secure" / "model.gguf").read_bytes() == data
    gets = [line for line in server.log_lines("/v0/models/blob/secure") if line.startswith("GET ")]
    assert len(gets) >= 6 and all(" 206 " in line for line in gets)  # ranged parts, over TLS
    m.stop()  # squid logs a tunnel when it closes: unmounting closes the kept-alive ones

    def tunnels() -> list[str]:
        return [line for line in squid.log_lines() if " CONNECT " in line]

    wait_for(lambda: len(tunnels()) >= 2, what="squid to log the tunnels")  # metadata's and at least a body's
    assert all(f"127.0.0.1:{server.port}" in line for line in tunnels()), squid.log_lines()
    assert not [line for line in squid.log_lines() if " GET " in line]  # nothing in clear through the proxy
