"""The model-body transport (modelfs.transport) against a scripted HTTP server on loopback: real sockets and real
bytes, with the answers the servers modelfs usually talks to never give (chunked bodies, bodies to the close,
informational answers, connections closed while idle, stalls). Keep-alive is counted on the server side."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from modelfs.transport import Pool, Response, Timeout, TransportError

Script = Callable[[socket.socket, bytes], bool]  # answers one request head; False: close the connection


class ScriptedServer:
    """Answers each request with the next script; counts connections and records request heads."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.heads: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.scripts:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._answer(conn)
            except OSError:  # the client hung up mid-answer: what some tests do on purpose
                pass

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while self.scripts:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            self.heads.append(head)
            if not self.scripts.pop(0)(conn, head):
                return

    def close(self) -> None:
        self.scripts.clear()
        self.listener.close()


@pytest.fixture
def server() -> Iterator[Callable[[list[Script]], ScriptedServer]]:
    started: list[ScriptedServer] = []

    def start(scripts: list[Script]) -> ScriptedServer:
        started.append(ScriptedServer(scripts))
        return started[-1]

    yield start
    for s in started:
        s.close()


def answer(body: bytes, head: str = "HTTP/1.1 200 OK", extra: str = "", length: bool = True,
           keep: bool = True) -> Script:
    def script(conn: socket.socket, _: bytes) -> bool:
        fields = f"Content-Length: {len(body)}\r\n" if length else ""
        conn.sendall(f"{head}\r\n{fields}{extra}\r\n".encode() + body)
        return keep
    return script


def read_all(response: Response, size: int = 1 << 16) -> bytes:
    buffer = memoryview(bytearray(size))
    out = bytearray()
    while got := response.readinto(buffer):
        out += buffer[:got]
    return bytes(out)


@pytest.fixture
def pool() -> Iterator[Callable[..., Pool]]:
    """`pool(read_timeout=5)` → a connection pool, closed at teardown."""
    pools: list[Pool] = []

    def make(read_timeout: float = 5.0) -> Pool:
        pools.append(Pool(ssl.create_default_context(), 2.0, read_timeout, "modelfs-test"))
        return pools[-1]

    yield make
    for p in pools:
        p.close()


def test_bodies_of_known_length_keep_their_connection(server, pool):
    bodies = [b"GGUF" + bytes(range(256)) * 400, b"second", b"third"]
    s = server([answer(body) for body in bodies])
    p = pool()
    for i, body in enumerate(bodies):
        with p.get(f"{s.url}/m/{i}", {"Range": "bytes=0-"}) as response:
            assert response.status == 200 and response.reused == (i > 0)
            assert response.headers["content-length"] == str(len(body))
            assert read_all(response, size=1000) == body
    assert s.connections == 1
    assert s.heads[0].startswith(b"GET /m/0 HTTP/1.1\r\n")
    assert b"host: 127.0.0.1:%d" % s.port in s.heads[0].lower() and b"range: bytes=0-" in s.heads[0].lower()


def test_a_body_read_only_in_part_closes_its_connection(server, pool):
    s = server([answer(b"x" * 100_000), answer(b"next")])
    p = pool()
    with p.get(s.url + "/a", {}) as response:
        assert response.readinto(memoryview(bytearray(10))) == 10
    with p.get(s.url + "/b", {}) as response:
        assert not response.reused and read_all(response) == b"next"
    assert s.connections == 2


def test_a_small_unread_body_is_read_off_so_the_connection_stays(server, pool):
    s = server([answer(b'{"error": "Model not found"}', "HTTP/1.1 404 Not Found"), answer(b"ok")])
    p = pool()
    with p.get(s.url + "/missing", {}) as response:
        assert response.status == 404
    with p.get(s.url + "/there", {}) as response:
        assert response.reused and read_all(response) == b"ok"
    assert s.connections == 1


def chunked(conn: socket.socket, _: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"4\r\nGGUF\r\n6\r\n-body-\r\n0\r\n\r\n")
    return True


def test_chunked_bodies_and_bodies_to_the_close(server, pool):
    s = server([chunked, answer(b"until the end", "HTTP/1.0 200 OK", length=False, keep=False), answer(b"new")])
    p = pool()
    with p.get(s.url + "/chunked", {}) as response:
        assert read_all(response, size=3) == b"GGUF-body-"
    with p.get(s.url + "/close", {}) as response:
        assert read_all(response) == b"until the end"
    with p.get(s.url + "/next", {}) as response:
        assert read_all(response) == b"new"
    assert s.connections == 3  # neither kind of body leaves a connection to reuse


def test_connection_close_and_http_1_0_are_not_reused(server, pool):
    s = server([answer(b"a", extra="Connection: close\r\n", keep=False), answer(b"b", "HTTP/1.0 200 OK", keep=False),
                answer(b"c")])
    p = pool()
    for name, body in (("a", b"a"), ("b", b"b"), ("c", b"c")):
        with p.get(f"{s.url}/{name}", {}) as response:
            assert not response.reused and read_all(response) == body
    assert s.connections == 3


def test_informational_answers_are_skipped(server, pool):
    def early_hints(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        return answer(b"final", "HTTP/1.1 206 Partial Content", "Content-Range: bytes 0-4/10\r\n")(conn, head)

    s = server([early_hints])
    with pool().get(s.url + "/x", {}) as response:
        assert response.status == 206 and response.headers["content-range"] == "bytes 0-4/10"
        assert read_all(response) == b"final"


def test_a_connection_the_server_closed_while_idle_is_replaced(server, pool):
    s = server([answer(b"one", keep=False), answer(b"two")])  # closes after answering, without saying so
    p = pool()
    with p.get(s.url + "/1", {}) as response:
        assert read_all(response) == b"one"
    time.sleep(0.1)
    with p.get(s.url + "/2", {}) as response:  # the kept connection is dead: a new one, no error
        assert not response.reused and read_all(response) == b"two"
    assert s.connections == 2


def test_a_stalled_answer_is_a_timeout(server, pool):
    def stall_head(conn: socket.socket, _: bytes) -> bool:
        time.sleep(1.5)
        return False

    s = server([stall_head])
    started = time.monotonic()
    with pytest.raises(Timeout):
        pool(read_timeout=0.5).get(s.url + "/head", {})
    assert time.monotonic() - started < 1.4


def test_a_body_that_stalls_raises_timeout_from_readinto(server, pool):
    def stall_body(conn: socket.socket, _: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nGGUF")
        time.sleep(1.5)
        return False

    s = server([stall_body])
    with pool(read_timeout=0.5).get(s.url + "/body", {}) as response:
        buffer = memoryview(bytearray(100))
        assert response.readinto(buffer) == 4
        with pytest.raises(Timeout):
            response.readinto(buffer)


def test_a_body_cut_short_ends_early_and_its_connection_goes(server, pool):
    s = server([answer(b"GGUF", extra="", length=False, keep=False, head="HTTP/1.1 200 OK\r\nContent-Length: 10"),
                answer(b"after")])
    p = pool()
    with p.get(s.url + "/cut", {}) as response:
        assert read_all(response) == b"GGUF"  # 4 of 10: the caller, who asked for 10, sees the shortfall
    with p.get(s.url + "/after", {}) as response:
        assert not response.reused and read_all(response) == b"after"


def test_refused_connections_and_bad_answers_are_transport_errors(server, pool):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(TransportError, match="connect to 127.0.0.1"):
        pool().get(f"http://127.0.0.1:{port}/m", {})
    s = server([lambda conn, _: conn.sendall(b"SMTP ready\r\n\r\n") or False])
    with pytest.raises(TransportError, match="bad HTTP answer"):
        pool().get(s.url + "/m", {})


def test_plain_http_goes_through_the_proxy_of_the_environment(server, pool, monkeypatch):
    s = server([answer(b"via proxy"), answer(b"direct")])
    monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{s.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pool().get("http://router.invalid:8080/v0/models/blob/m", {}) as response:
        assert read_all(response) == b"via proxy"
    request = s.heads[0].decode()
    assert request.startswith("GET http://router.invalid:8080/v0/models/blob/m HTTP/1.1\r\n")
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'user:p@ss').decode()}".lower() in request.lower()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = server([answer(b"direct")])
    with pool().get(direct.url + "/m", {}) as response:
        assert read_all(response) == b"direct"
    assert direct.heads[0].startswith(b"GET /m HTTP/1.1")


def test_a_proxy_modelfs_cannot_speak_to_is_a_clear_error(pool, monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(TransportError, match="unsupported proxy socks5"):
        pool().get("http://router.invalid/m", {})
