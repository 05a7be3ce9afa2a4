"""The llmlb router's HTTP API, as modelfs uses it: blob HEAD/GET and the model list.

Only the configured router URLs are ever contacted: redirects are followed by hand and only to a configured
origin. Routers are tried in order, failing over on connection errors, timeouts and 5xx. Standard proxy variables
(HTTP_PROXY, HTTPS_PROXY, NO_PROXY) apply, so a caching proxy can sit in front. The API key goes out as
`Authorization: Bearer` and is never logged.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpcore
import httpx
import trio

from . import metrics, names
from .config import Config

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
#: httpcore reads the socket 64 KiB at a time, which halves download speed on fast links; 1 MiB reads keep up
#: with curl. A process-wide class attribute, but this process is modelfs and nothing else.
SOCKET_READ = 1 << 20
httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES = SOCKET_READ
httpcore._async.http11.AsyncHTTP11Connection.READ_NUM_BYTES = SOCKET_READ
USER_AGENT = "modelfs"
#: A body socket wakes the download thread only once this many bytes are queued (SO_RCVLOWAT). nginx's sendfile
#: lands on the receiver ~96 KiB at a time, and waking per arrival costs ~150 µs each: 2 s of CPU per GiB and half
#: the speed of curl. The test router's blocking 8 MiB sendfile hid this.
BODY_LOWAT = 1 << 20
#: ...but never more than this many seconds' worth of bytes at the rate seen so far: a slow stream must not look
#: stalled (read_timeout) or keep readers waiting for a full MiB.
LOWAT_SECONDS = 0.05


class RouterError(Exception):
    """No configured router could answer; the message names router, model and status."""


class NotFound(Exception):
    """Every router that answered said the model does not exist."""


@dataclass(frozen=True)
class RemoteModel:
    """A model as a router describes it, before any byte of it is fetched."""

    name: str
    size: int
    router: str


@dataclass
class RouterState:
    """What one router last did, for status output."""

    url: str
    last_status: str = "never contacted"
    last_time: float = 0.0


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class Router:
    """All configured routers, with failover. Metadata calls are async (trio); blob streams are blocking."""

    def __init__(self, config: Config) -> None:
        self.urls = config.router
        self.retries = config.retries
        self.download_streams = config.download_streams  # ranged GETs at once per model, where Range is honoured
        self.download_part_size = config.download_part_size
        self.states = {url: RouterState(url) for url in self.urls}
        self._origins = {_origin(url) for url in self.urls}
        headers = {"User-Agent": USER_AGENT}
        if config.router_token:
            headers["Authorization"] = f"Bearer {config.router_token}"
        # Metadata must answer fast (a lookup waits on it); bodies may stall up to read_timeout.
        self._meta_timeout = httpx.Timeout(min(config.read_timeout, 5.0), connect=config.connect_timeout)
        self._blob_timeout = httpx.Timeout(config.read_timeout, connect=config.connect_timeout)
        self.aclient = httpx.AsyncClient(headers=headers, timeout=self._meta_timeout, follow_redirects=False)
        self.client = httpx.Client(headers=headers, timeout=self._blob_timeout, follow_redirects=False)

    async def aclose(self) -> None:
        await self.aclient.aclose()
        self.client.close()

    def blob_url(self, base: str, name: str) -> str:
        return f"{base}/v0/models/blob/{quote(names.validate(name), safe='')}"

    def _note(self, base: str, status: str) -> None:
        metrics.ROUTER_REQUESTS.labels(router=base, status=metrics.router_status(status)).inc()
        state = self.states[base]
        state.last_status = status
        state.last_time = time.time()

    def _next_url(self, response: httpx.Response) -> str:
        """Where a redirect points, if it stays on a configured router; RouterError otherwise."""
        location = response.headers.get("location")
        if not location:
            raise RouterError(f"{response.url}: redirect {response.status_code} without Location")
        target: str = urljoin(str(response.url), str(location))
        if _origin(target) not in self._origins:
            raise RouterError(
                f"{response.url}: refusing redirect to {target}: modelfs contacts only the configured routers"
            )
        return target

    async def head(self, name: str) -> RemoteModel:
        """The size of `name` on the first router that has it. NotFound or RouterError otherwise.

        A failure of every router is tried once more after a short pause: one blip must not fail an open.
        """
        try:
            return await self._head(name)
        except RouterError:
            await trio.sleep(0.2)
            return await self._head(name)

    async def _head(self, name: str) -> RemoteModel:
        errors: list[str] = []
        for base in self.urls:
            url = self.blob_url(base, name)
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    response = await self.aclient.head(url)
                    if not response.is_redirect:
                        break
                    url = self._next_url(response)
                if response.status_code == 404:
                    self._note(base, "404")
                    continue
                if response.status_code != 200:
                    raise RouterError(f"HTTP {response.status_code}")
                size = int(response.headers.get("content-length", "-1"))
                if size <= 0:
                    size = await self._size_by_range(url)
                self._note(base, "200")
                return RemoteModel(name, size, base)
            except (httpx.HTTPError, RouterError, ValueError) as exc:
                message = _describe(exc)
                self._note(base, message)
                errors.append(f"{base}: {message}")
        if errors:
            raise RouterError(f"model {name!r}: " + "; ".join(errors))
        raise NotFound(name)

    async def _size_by_range(self, url: str) -> int:
        """Size from `Range: bytes=0-0` when HEAD gave none (some proxies)."""
        async with self.aclient.stream("GET", url, headers={"Range": "bytes=0-0"}) as response:
            if response.status_code == 206:
                total = response.headers.get("content-range", "").rpartition("/")[2]
                return int(total)
            if response.status_code == 200:
                return int(response.headers["content-length"])
            raise RouterError(f"HTTP {response.status_code} to a Range request")

    async def list_models(self) -> dict[str, int]:
        """Every model the routers list, with sizes (-1 if not given). Unreachable routers are skipped;
        RouterError if none answered, so a caller can tell "no models" from "no answer"."""
        found: dict[str, int] = {}
        errors: list[str] = []
        for base in reversed(self.urls):  # earlier routers win on duplicates
            try:
                response = await self.aclient.get(f"{base}/v0/models")
                response.raise_for_status()
                found.update(parse_model_list(response.json()))
                self._note(base, "list ok")
            except (httpx.HTTPError, ValueError) as exc:
                self._note(base, _describe(exc))
                log.info("router %s: cannot list models (%s)", base, _describe(exc))
                errors.append(f"{base}: {_describe(exc)}")
        if len(errors) == len(self.urls):
            raise RouterError("no router listed its models: " + "; ".join(errors))
        return found

    @contextmanager
    def stream(self, name: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """Open the blob GET of `name` on the first router that serves it; blocking, for a worker thread.

        Raises NotFound if every router that answered said 404, RouterError if none could serve it.
        """
        errors: list[str] = []
        saw_404 = False
        for base in self.urls:
            url = self.blob_url(base, name)
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    response = self.client.send(self.client.build_request("GET", url, headers=headers), stream=True)
                    if not response.is_redirect:
                        break
                    response.close()
                    url = self._next_url(response)
                if response.status_code == 404:
                    response.close()
                    self._note(base, "404")
                    saw_404 = True
                    continue
                if response.status_code not in (200, 206):
                    response.close()
                    raise RouterError(f"HTTP {response.status_code}")
            except (httpx.HTTPError, RouterError) as exc:
                message = _describe(exc)
                self._note(base, message)
                errors.append(f"{base}: {message}")
                continue
            self._note(base, str(response.status_code))
            try:
                yield response
            finally:
                response.close()
            return
        if saw_404 and not errors:
            raise NotFound(name)
        raise RouterError(f"model {name!r}: " + "; ".join(errors or ["no router configured"]))


def iter_body(response: httpx.Response) -> Iterator[bytes]:
    """The raw body of a blob response in large chunks, for a worker thread.

    Raises the low-water mark of the socket (see BODY_LOWAT) to what arrives in LOWAT_SECONDS at the rate seen so
    far, and to what is left of the body near its end (a kept-alive connection sends no EOF to wake us). h11 hands
    out every body byte it has buffered, so "left" is what is still on the wire.
    """
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    length = response.headers.get("content-length")
    left = int(length) if length and length.isdigit() else None
    lowat = 1
    began = time.monotonic()
    got = 0
    try:
        for chunk in response.iter_raw():
            yield chunk
            got += len(chunk)
            if sock is None or left is None:
                continue
            rate = got / max(time.monotonic() - began, 1e-3)
            wanted = max(1, min(BODY_LOWAT, int(rate * LOWAT_SECONDS), left - got))
            if wanted != lowat and (wanted < lowat or wanted >= 2 * lowat):
                lowat = _set_lowat(sock, wanted)
    finally:
        if lowat != 1 and sock is not None:
            _set_lowat(sock, 1)  # the connection goes back to the pool: the next response starts with headers


def _set_lowat(sock: socket.socket, value: int) -> int:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
    except OSError:
        return 1  # closed underneath us: nothing more to read anyway
    return value


def parse_model_list(data: Any) -> dict[str, int]:
    """Names and sizes from llmlb's `/v0/models`: a JSON array or `{"data": [...]}` of objects."""
    items = data.get("data", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError("model list is neither an array nor {'data': [...]}")
    models: dict[str, int] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        name = item.get("id") or item.get("name")
        if not isinstance(name, str):
            continue
        try:
            names.validate(name)
        except names.InvalidName:
            continue
        size = item.get("size_bytes", item.get("size"))
        models[name] = size if isinstance(size, int) and size > 0 else -1
    return models


def _describe(exc: Exception) -> str:
    """A short reason for a log line; never includes request headers (the API key)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)


