"""Fast tests of the test infrastructure itself: router_server.py (real subprocess, real HTTP
on loopback, both flavours, every fault mode) and ggufmaker (files read back by gguf.GGUFReader).
If these fail, modelfs test failures mean nothing.
"""
from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from tests.support.ggufmaker import make_gguf, make_gguf_of_size, read_tensors, tensors_equal, tensors_match
from tests.support.router import RouterProcess

BIG = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (GGUF), org/model (GGUF, nested name), big (~4 MiB GGUF), empty (0 bytes)."""
    root = tmp_path_factory.mktemp("models")
    make_gguf(root / "tiny" / "model.gguf", seed=1)
    make_gguf(root / "org" / "model" / "model.gguf", seed=2, name="org-model")
    make_gguf_of_size(root / "big" / "model.gguf", BIG, seed=3)
    (root / "empty").mkdir()
    (root / "empty" / "model.gguf").write_bytes(b"")
    (root / "not-a-model").mkdir()
    return root


@pytest.fixture(scope="module")
def llmlb_server(models_dir: Path) -> Iterator[RouterProcess]:
    with RouterProcess(models_dir, flavour="llmlb") as router:
        yield router
    assert "Traceback" not in router.log_text()


@pytest.fixture(scope="module")
def range_server(models_dir: Path) -> Iterator[RouterProcess]:
    with RouterProcess(models_dir, flavour="range") as router:
        yield router
    assert "Traceback" not in router.log_text()


@pytest.fixture
def llmlb(llmlb_server: RouterProcess) -> Iterator[RouterProcess]:
    """Shared server, clean faults/stats per test (reset also releases hung requests)."""
    llmlb_server.reset()
    yield llmlb_server
    llmlb_server.reset()


@pytest.fixture
def ranged(range_server: RouterProcess) -> Iterator[RouterProcess]:
    range_server.reset()
    yield range_server
    range_server.reset()


def blob(models_dir: Path, name: str) -> bytes:
    return (models_dir / name / "model.gguf").read_bytes()


def raw_request(router: RouterProcess, method: str, path: str,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """http.client so the path goes out exactly as written (httpx would normalise '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- ggufmaker


def test_make_gguf_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "model.gguf"
    tensors = make_gguf(path, seed=5, n_tensors=3, tensor_elems=100, name="roundtrip")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.name"].contents() == "roundtrip"
    got = {t.name: np.array(t.data) for t in reader.tensors}
    assert got.keys() == tensors.keys() and len(got) == 3
    for name, data in tensors.items():
        assert data.dtype == np.float32
        np.testing.assert_array_equal(got[name], data)
    assert tensors_match(path, tensors)

    make_gguf(tmp_path / "same.gguf", seed=5, n_tensors=3, tensor_elems=100, name="roundtrip")
    make_gguf(tmp_path / "other.gguf", seed=6, n_tensors=3, tensor_elems=100, name="roundtrip")
    assert tensors_equal(path, tmp_path / "same.gguf")
    assert not tensors_equal(path, tmp_path / "other.gguf")


def test_make_gguf_of_size(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 12345
    a = make_gguf_of_size(tmp_path / "x" / "model.gguf", size, seed=1)
    b = make_gguf_of_size(tmp_path / "y" / "model.gguf", size, seed=1)
    assert size - 1024 * 1024 <= a.stat().st_size <= size
    assert tensors_equal(a, b)
    assert sum(t.nbytes for t in read_tensors(a).values()) > size - 1024 * 1024


# --------------------------------------------------------------------------- llmlb flavour


def test_llmlb_blob_ignores_range_and_has_no_validators(llmlb: RouterProcess, models_dir: Path) -> None:
    expected = blob(models_dir, "org/model")
    for path in ("/v0/models/blob/org%2Fmodel", "/v0/models/blob/org/model"):
        r = httpx.get(llmlb.url + path, headers={"Range": "bytes=10-19"})
        assert r.status_code == 200
        assert r.content == expected
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-length"] == str(len(expected))
        assert r.headers["content-disposition"] == 'attachment; filename="model.gguf"'
        assert "etag" not in r.headers and "last-modified" not in r.headers
    stats = llmlb.stats()
    assert stats["blob_gets"] == {"org/model": 2}
    assert llmlb.bytes_sent("org/model") == 2 * len(expected)
    assert stats["requests"][0]["range"] == "bytes=10-19"


def test_head_matches_get_without_body(llmlb: RouterProcess, ranged: RouterProcess, models_dir: Path) -> None:
    size = len(blob(models_dir, "tiny"))
    for router in (llmlb, ranged):
        status, headers, body = raw_request(router, "HEAD", "/v0/models/blob/tiny")
        assert (status, body) == (200, b"")
        assert headers["content-length"] == str(size)
        assert router.bytes_sent("tiny") == 0
        assert router.blob_gets("tiny") == 0  # HEAD is not a GET
    status, headers, _ = raw_request(ranged, "HEAD", "/v0/models/blob/tiny", {"Range": "bytes=0-9"})
    assert status == 206 and headers["content-length"] == "10"
    assert headers["content-range"] == f"bytes 0-9/{size}"


def test_list_data_format(llmlb: RouterProcess, models_dir: Path) -> None:
    r = httpx.get(llmlb.url + "/v0/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["big", "org/model", "tiny"]  # empty/ and not-a-model/ skipped
    assert all(m["status"] == "ready" for m in data)
    assert data[2]["size_bytes"] == len(blob(models_dir, "tiny"))


def test_list_array_format(models_dir: Path) -> None:
    with RouterProcess(models_dir, list_format="array") as router:
        models = httpx.get(router.url + "/v0/models").json()
    assert isinstance(models, list)
    assert [m["name"] for m in models] == ["big", "org/model", "tiny"]


@pytest.mark.parametrize("name", ["missing", "org", "empty", "org/missing"])
def test_not_found(llmlb: RouterProcess, name: str) -> None:
    r = httpx.get(f"{llmlb.url}/v0/models/blob/{name}")
    assert r.status_code == 404
    assert r.json() == {"error": f"Model not found: {name}"}


@pytest.mark.parametrize("path", ["Tiny", "org/../tiny", "org%2F..%2Ftiny", "%2Ftiny", "tiny%2F",
                                  "org//model", "ti%20ny", ""])
def test_invalid_name(llmlb: RouterProcess, path: str) -> None:
    status, headers, body = raw_request(llmlb, "GET", "/v0/models/blob/" + path)
    assert status == 400, body
    assert "error" in httpx.Response(status, content=body).json()


def test_auth(models_dir: Path) -> None:
    with RouterProcess(models_dir, token="s3cret") as router:
        base = router.url + "/v0/models/blob/tiny"
        assert httpx.get(base).status_code == 401
        assert httpx.get(base, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(router.url + "/v0/models").status_code == 401
        assert httpx.get(base, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(base, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert router.stats()["requests"][-1]["auth"] == "s3cret"
        assert "s3cret" not in router.proc.args  # passed via env, not argv


# --------------------------------------------------------------------------- range flavour


def test_range_requests(ranged: RouterProcess, models_dir: Path) -> None:
    data = blob(models_dir, "big")
    size = len(data)
    url = ranged.url + "/v0/models/blob/big"
    full = httpx.get(url)
    assert full.status_code == 200 and full.content == data
    etag, last_modified = full.headers["etag"], full.headers["last-modified"]
    assert full.headers["accept-ranges"] == "bytes"

    cases = {"bytes=100-": (100, size - 1), "bytes=5-9": (5, 9), "bytes=-10": (size - 10, size - 1),
             f"bytes=10-{size + 100}": (10, size - 1)}
    for header, (start, end) in cases.items():
        r = httpx.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert r.content == data[start:end + 1]

    r = httpx.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert httpx.get(url, headers={"Range": "bytes=9-5"}).status_code == 200  # invalid -> ignored

    for validator in (etag, last_modified):
        r = httpx.get(url, headers={"Range": "bytes=0-3", "If-Range": validator})
        assert r.status_code == 206 and r.content == data[:4]
    r = httpx.get(url, headers={"Range": "bytes=0-3", "If-Range": '"stale-etag"'})
    assert r.status_code == 200 and r.content == data
    assert ranged.stats()["requests"][-1]["if_range"] == '"stale-etag"'


def test_connections_are_counted_once_however_many_requests_they_carry(ranged: RouterProcess,
                                                                       models_dir: Path) -> None:
    data = blob(models_dir, "big")
    with httpx.Client() as client:  # one kept-alive connection for three requests
        for start in (0, 100, 1000):
            r = client.get(ranged.url + "/v0/models/blob/big", headers={"Range": f"bytes={start}-{start + 9}"})
            assert r.status_code == 206 and r.content == data[start:start + 10]
    for _ in range(2):  # a new connection each
        assert httpx.get(ranged.url + "/v0/models/blob/tiny").status_code == 200
    assert ranged.connections() == 3
    ranged.reset()
    assert ranged.connections() == 0


# --------------------------------------------------------------------------- faults


def test_fault_status_respects_models_filter(llmlb: RouterProcess) -> None:
    llmlb.control(status=503, models=["tiny"])
    assert httpx.get(llmlb.url + "/v0/models/blob/tiny").status_code == 503
    assert raw_request(llmlb, "HEAD", "/v0/models/blob/tiny")[0] == 503
    assert httpx.get(llmlb.url + "/v0/models/blob/org/model").status_code == 200
    llmlb.control(status=None)
    assert httpx.get(llmlb.url + "/v0/models/blob/tiny").status_code == 200


def test_fault_fail_first(llmlb: RouterProcess) -> None:
    llmlb.control(fail_first=2)
    codes = [httpx.get(llmlb.url + "/v0/models/blob/tiny").status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert llmlb.blob_gets("tiny") == 3


def test_fault_truncate_counts_bytes_truthfully(llmlb: RouterProcess, models_dir: Path) -> None:
    llmlb.control(truncate_after=1000, truncate_times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(llmlb.url + "/v0/models/blob/big")
    assert llmlb.bytes_sent("big") == 1000
    r = httpx.get(llmlb.url + "/v0/models/blob/big")  # truncate_times used up
    assert r.status_code == 200 and r.content == blob(models_dir, "big")
    assert llmlb.bytes_sent("big") == 1000 + len(r.content)


def test_fault_truncate_on_range_response(ranged: RouterProcess, models_dir: Path) -> None:
    ranged.control(truncate_after=10)
    with httpx.Client() as client, client.stream(
            "GET", ranged.url + "/v0/models/blob/big", headers={"Range": "bytes=100-"}) as r:
        assert r.status_code == 206
        got = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in r.iter_raw():
                got += chunk
    assert got == blob(models_dir, "big")[100:110]
    assert ranged.bytes_sent("big") == 10


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """Start `call` (an HTTP request) in a thread; the httpx error it ends with, if any, lands in the list."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except httpx.HTTPError as exc:
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, outcome


def test_fault_hang_does_not_block_other_requests(llmlb: RouterProcess) -> None:
    llmlb.control(hang=True, models=["tiny"])
    t, outcome = in_thread(lambda: httpx.get(llmlb.url + "/v0/models/blob/tiny", timeout=0.5))
    time.sleep(0.1)
    assert httpx.get(llmlb.url + "/v0/models/blob/org/model", timeout=2).status_code == 200
    assert httpx.get(llmlb.url + "/v0/models", timeout=2).status_code == 200
    t.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.ReadTimeout)
    assert [r["status"] for r in llmlb.stats()["requests"]][0] is None  # never answered


def test_fault_hang_cleared_closes_connection(llmlb: RouterProcess) -> None:
    llmlb.control(hang=True)
    t, outcome = in_thread(lambda: httpx.head(llmlb.url + "/v0/models/blob/tiny", timeout=5))
    deadline = time.monotonic() + 5  # until the server holds the request (a loaded machine may take a while)
    while not any(r["method"] == "HEAD" for r in llmlb.stats()["requests"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert t.is_alive()
    llmlb.control(hang=False)
    t.join(2)
    assert not t.is_alive() and isinstance(outcome[0], httpx.RemoteProtocolError)


def test_fault_hang_body_after(llmlb: RouterProcess, models_dir: Path) -> None:
    llmlb.control(hang_body_after=5000)
    got = b""
    with httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as client, \
            client.stream("GET", llmlb.url + "/v0/models/blob/big") as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(len(blob(models_dir, "big")))
        with pytest.raises(httpx.ReadTimeout):
            for chunk in r.iter_raw():
                got += chunk
    assert got == blob(models_dir, "big")[:5000]
    assert llmlb.bytes_sent("big") == 5000


def test_fault_rate_and_client_abort(llmlb: RouterProcess, models_dir: Path) -> None:
    rate = 100_000  # tiny (~16 KiB) goes out in rate/20-byte chunks -> ~0.17 s
    llmlb.control(rate=rate)
    t0 = time.monotonic()
    r = httpx.get(llmlb.url + "/v0/models/blob/tiny")
    small = len(blob(models_dir, "tiny"))
    assert r.status_code == 200 and len(r.content) == small
    assert time.monotonic() - t0 >= small / rate * 0.6

    with httpx.Client() as client, client.stream("GET", llmlb.url + "/v0/models/blob/big") as resp:
        next(resp.iter_raw(1000))  # read a little, then hang up mid-body
    time.sleep(0.5)
    sent = llmlb.bytes_sent("big")
    assert 0 < sent < len(blob(models_dir, "big")) // 2
    assert httpx.get(llmlb.url + "/v0/models", timeout=2).status_code == 200  # still alive
    assert "Traceback" not in llmlb.log_text()


def test_fault_redirect(llmlb: RouterProcess, ranged: RouterProcess, models_dir: Path) -> None:
    llmlb.control(redirect=ranged.url + "/")
    r = httpx.get(llmlb.url + "/v0/models/blob/org%2Fmodel")
    assert r.status_code == 302
    assert r.headers["location"] == ranged.url + "/v0/models/blob/org/model"
    followed = httpx.get(llmlb.url + "/v0/models/blob/org/model", follow_redirects=True)
    assert followed.status_code == 200 and followed.content == blob(models_dir, "org/model")
    assert ranged.blob_gets("org/model") == 1


def test_fault_list_status_and_hang(llmlb: RouterProcess) -> None:
    llmlb.control(list_status=500)
    assert httpx.get(llmlb.url + "/v0/models").status_code == 500
    assert httpx.get(llmlb.url + "/v0/models/blob/tiny").status_code == 200  # blobs unaffected
    llmlb.control(list_status=None, list_hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(llmlb.url + "/v0/models", timeout=0.3)


def test_control_rejects_unknown_field_and_reset_clears(llmlb: RouterProcess) -> None:
    with pytest.raises(RuntimeError, match="unknown fault fields"):
        llmlb.control(no_such_fault=1)
    llmlb.control(status=500)
    httpx.get(llmlb.url + "/v0/models/blob/tiny")
    deadline = time.monotonic() + 5  # the server counts the bytes just after the client has them
    while llmlb.bytes_sent("tiny") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    llmlb.reset()
    assert llmlb.stats() == {"requests": [], "bytes_sent": {}, "blob_gets": {}, "connections": 0}
    assert httpx.get(llmlb.url + "/v0/models/blob/tiny").status_code == 200


def test_startup_failure_reports_stderr(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="invalid choice"):
        RouterProcess(tmp_path, flavour="bogus")
