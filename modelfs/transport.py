"""The model-body transport: blocking HTTP/1.1 GETs for download threads, over sockets modelfs owns.

h11 writes the request and parses the response head. A body whose length the head gives is then read straight from
the socket into the caller's buffer (`recv_into`, with SO_RCVLOWAT so that a MiB costs one wake-up), never copied
in user space; once a message is read to its end its connection goes back to a pool, so the parts of a download
share a few kept-alive connections instead of opening one each. Other bodies (chunked, or to the close) are read
through h11: correct, slower, and not what the servers modelfs talks to send. TLS is the stdlib's; proxies come
from the standard variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), https through them with CONNECT.
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import h11

#: A body socket wakes its thread only once this many bytes are queued (SO_RCVLOWAT): waking per arrival costs
#: ~150 µs each, 2 s of CPU per GiB from nginx, whose sendfile lands ~96 KiB at a time.
BODY_LOWAT = 1 << 20
#: ...but never more than this many seconds' worth at the rate seen so far, so a slow stream never looks stalled.
LOWAT_SECONDS = 0.05
HEAD_READ = 64 << 10  # bytes per recv while reading a response head
DRAIN = 64 << 10  # an unread body up to this size is read off so that its connection can be kept
KEEP_IDLE = 30.0  # seconds an idle connection is kept (servers close theirs after 60-75 s)
MAX_IDLE = 16  # idle connections kept per origin


class TransportError(Exception):
    """No answer: connection refused or broken, a protocol error. The message never holds a header value."""


class Timeout(TransportError):
    """The server did not answer, or stalled, within the timeout."""


class _Stale(Exception):
    """A kept-alive connection was closed by the server before it answered: retry on a new one."""


@dataclass(frozen=True)
class Route:
    """Where a request's socket goes: the origin, and the proxy in between if any."""

    scheme: str
    host: str
    port: int
    proxy: tuple[str, int] | None = None
    proxy_auth: str | None = None  # a Proxy-Authorization value, from the proxy URL's user:password


def route_for(url: str) -> tuple[Route, str]:
    """The route of `url` (the proxy from the environment, unless NO_PROXY says otherwise) and its target."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxies = urllib.request.getproxies()
    proxy_url = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy_url or urllib.request.proxy_bypass(f"{parts.hostname}:{port}"):
        return Route(parts.scheme, parts.hostname, port), target
    proxy = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    if proxy.scheme != "http" or not proxy.hostname:
        raise TransportError(f"unsupported proxy {proxy.scheme}://{proxy.hostname}: modelfs speaks to http:// "
                             "proxies (https through them with CONNECT)")
    auth = None
    if proxy.username is not None:
        secret = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        auth = "Basic " + base64.b64encode(secret).decode()
    route = Route(parts.scheme, parts.hostname, port, (proxy.hostname, proxy.port or 80), auth)
    return route, url if parts.scheme == "http" else target  # plain http via a proxy: absolute form


def _authority(route: Route) -> str:
    host = f"[{route.host}]" if ":" in route.host else route.host
    default = 443 if route.scheme == "https" else 80
    return host if route.port == default else f"{host}:{route.port}"


class Connection:
    """One socket to a route; `tls` when it is an ssl socket (no SO_RCVLOWAT there)."""

    def __init__(self, sock: socket.socket, route: Route) -> None:
        self.sock = sock
        self.route = route
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        """Whether an idle connection can carry another request: not idle too long, and nothing to read on it
        (a readable idle socket is one the server closed, or one carrying junk)."""
        if time.monotonic() - self.idle_since > KEEP_IDLE:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Pool:
    """Kept-alive connections by route; thread-safe. `get` opens a blob GET, blocking (a worker thread's call)."""

    def __init__(self, ssl_context: ssl.SSLContext, connect_timeout: float, read_timeout: float,
                 user_agent: str) -> None:
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._user_agent = user_agent
        self._lock = threading.Lock()
        self._idle: dict[Route, list[Connection]] = {}
        self._closed = False

    def get(self, url: str, headers: dict[str, str]) -> Response:
        """Send `GET url` with `headers`; the response once its head has arrived. TransportError otherwise."""
        route, target = route_for(url)
        while True:
            conn = self._take(route)
            reused = conn is not None
            if conn is None:
                conn = self._connect(route)
            try:
                return self._exchange(conn, target, headers, url, reused)
            except _Stale:
                conn.close()  # and try again: the server closed a connection it had kept
            except BaseException:
                conn.close()
                raise

    def put(self, conn: Connection) -> None:
        """A connection whose last message was read to its end is free for the next request."""
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(conn.route, [])
            if not self._closed and len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _take(self, route: Route) -> Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(route)
                if not idle:
                    return None
                conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()

    def _connect(self, route: Route) -> Connection:
        address = route.proxy or (route.host, route.port)
        where = f"{address[0]}:{address[1]}" + (" (proxy)" if route.proxy else "")
        try:
            sock = socket.create_connection(address, timeout=self._connect_timeout)
        except TimeoutError:
            raise Timeout(f"connect to {where}: timed out after {self._connect_timeout:g}s") from None
        except OSError as exc:
            raise TransportError(f"connect to {where}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if route.scheme == "https":
                if route.proxy:
                    self._tunnel(sock, route)
                sock = self._ssl.wrap_socket(sock, server_hostname=route.host)
        except TimeoutError:
            sock.close()
            raise Timeout(f"connect to {where}: TLS or tunnel timed out") from None
        except (OSError, h11.ProtocolError) as exc:
            sock.close()
            raise TransportError(f"connect to {route.host}:{route.port} via {where}: {exc}") from None
        sock.settimeout(self._read_timeout)
        return Connection(sock, route)

    def _tunnel(self, sock: socket.socket, route: Route) -> None:
        """CONNECT through the proxy; afterwards `sock` carries bytes to the origin."""
        http = h11.Connection(h11.CLIENT)
        authority = f"[{route.host}]:{route.port}" if ":" in route.host else f"{route.host}:{route.port}"
        headers = [("Host", authority)] + ([("Proxy-Authorization", route.proxy_auth)] if route.proxy_auth else [])
        sock.sendall(http.send(h11.Request(method="CONNECT", target=authority, headers=headers)) or b"")
        head = _read_head(http, sock, reused=False)
        if not 200 <= head.status_code < 300:
            raise OSError(f"the proxy answered HTTP {head.status_code} to CONNECT")

    def _exchange(self, conn: Connection, target: str, extra: dict[str, str], url: str, reused: bool) -> Response:
        http = h11.Connection(h11.CLIENT)
        headers = [("Host", _authority(conn.route)), ("User-Agent", self._user_agent), *extra.items()]
        if conn.route.proxy and conn.route.scheme == "http" and conn.route.proxy_auth:
            headers.append(("Proxy-Authorization", conn.route.proxy_auth))
        request = h11.Request(method="GET", target=target, headers=headers)
        try:
            conn.sock.sendall((http.send(request) or b"") + (http.send(h11.EndOfMessage()) or b""))
            head = _read_head(http, conn.sock, reused)
        except TimeoutError:
            raise Timeout(f"no answer within {self._read_timeout:g}s") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if reused:
                raise _Stale from None
            raise TransportError(f"connection broken: {exc.strerror}") from None
        except OSError as exc:
            raise TransportError(f"{exc.strerror or exc}") from None
        except h11.ProtocolError as exc:
            raise TransportError(f"bad HTTP answer: {exc}") from None
        return Response(self, conn, http, head, url, reused)


def _read_head(http: h11.Connection, sock: socket.socket, reused: bool) -> h11.Response:
    """Read until the final response head (1xx skipped); _Stale if a reused connection closed before any byte."""
    got = 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(HEAD_READ)
            if not data and not got and reused:
                raise _Stale
            got += len(data)
            http.receive_data(data)
        elif isinstance(event, h11.Response):
            return event
        elif isinstance(event, h11.ConnectionClosed):
            raise OSError("connection closed before an answer")
        elif not isinstance(event, h11.InformationalResponse):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before the response head")


class Response:
    """One response whose head has arrived; the body is read with `readinto`, and `close` (always) frees the
    connection: back to the pool if the message was read to its end and both sides keep it alive."""

    def __init__(self, pool: Pool, conn: Connection, http: h11.Connection, head: h11.Response, url: str,
                 reused: bool) -> None:
        self.status = head.status_code
        self.url = url
        self.reused = reused  # on a kept-alive connection
        self.headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self._pool = pool
        self._conn: Connection | None = conn
        self._http = http
        keep = head.http_version == b"1.1" and "close" not in self.headers.get("connection", "").lower()
        length = self.headers.get("content-length", "")
        self._direct = length.isdigit() and "transfer-encoding" not in self.headers
        self._left: int | None = int(length) if self._direct else None  # body bytes still to read, if known
        self._keep = keep and self._direct
        self._pending = memoryview(http.trailing_data[0]) if self._direct else memoryview(b"")
        self._ended = self._left == 0
        self._began = time.monotonic()
        self._got = 0
        self._lowat = 1

    def readinto(self, view: memoryview) -> int:
        """Read up to len(view) body bytes into `view`; 0 once the body has ended (also when it broke off: the
        caller, who knows how many bytes it asked for, tells the two apart)."""
        if self._ended or self._conn is None or not len(view):
            return 0
        try:
            got = self._read_direct(view) if self._direct else self._read_h11(view)
        except TimeoutError:
            self._drop()
            raise Timeout(f"{self.url}: the body stalled for longer than the read timeout") from None
        except OSError as exc:
            self._drop()
            raise TransportError(f"{self.url}: body broken off: {exc.strerror or exc}") from None
        except h11.ProtocolError as exc:
            self._drop()
            raise TransportError(f"{self.url}: bad body: {exc}") from None
        self._got += got
        if got == 0:
            self._ended = True
            self._keep = False  # the server closed before the end (or at it, for a body of unknown length)
        return got

    def _read_direct(self, view: memoryview) -> int:
        assert self._conn is not None and self._left is not None
        want = min(len(view), self._left)
        if self._pending:
            got = min(want, len(self._pending))
            view[:got] = self._pending[:got]
            self._pending = self._pending[got:]
        else:
            if not self._conn.tls:
                self._tune_lowat(want)
            got = self._conn.sock.recv_into(view, want)
        self._left -= got
        if self._left == 0:
            self._ended = True
        return got

    def _tune_lowat(self, want: int) -> None:
        """Wake only once a MiB is queued, or LOWAT_SECONDS of bytes at the rate seen, or all that is left."""
        assert self._conn is not None and self._left is not None
        rate = self._got / max(time.monotonic() - self._began, 1e-3)
        wanted = max(1, min(BODY_LOWAT, int(rate * LOWAT_SECONDS), want)) if self._got else 1
        if wanted != self._lowat and (wanted < self._lowat or wanted >= 2 * self._lowat):
            self._set_lowat(wanted)

    def _set_lowat(self, value: int) -> None:
        assert self._conn is not None
        self._conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        self._lowat = value

    def _read_h11(self, view: memoryview) -> int:
        assert self._conn is not None
        while True:
            if self._pending:
                got = min(len(view), len(self._pending))
                view[:got] = self._pending[:got]
                self._pending = self._pending[got:]
                return got
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                self._http.receive_data(self._conn.sock.recv(HEAD_READ))
            elif isinstance(event, h11.Data):
                self._pending = memoryview(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return 0

    def close(self) -> None:
        """Free the connection: kept if the message is complete (a small unread body is read off first)."""
        conn = self._conn
        if conn is None:
            return
        if not self._ended and self._keep and self._left is not None and self._left <= DRAIN:
            try:
                scratch = memoryview(bytearray(DRAIN))
                while not self._ended and self.readinto(scratch):
                    pass
            except TransportError:
                return
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if not (self._ended and self._keep and not self._pending):
            conn.close()
            return
        try:
            if self._lowat != 1:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # the next answer starts with a head
        except OSError:
            conn.close()
            return
        self._pool.put(conn)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
