"""The llmlb router's HTTP API, as modelfs uses it: blob HEAD/GET and the model list.

Only the configured router URLs are ever contacted: redirects are followed by hand and only to a configured
origin. Routers are tried in order, failing over on connection errors, timeouts and 5xx. Standard proxy variables
(HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) apply, so a caching proxy can sit in front. The API key goes out as
`Authorization: Bearer` and is never logged. Metadata (HEAD, the list) is asked on the trio loop with httpx; model
bodies go through `transport`, blocking, in download threads. Where a model's bytes are is the `blob_url`
template (default `{router}/v0/models/blob/{name}`), so a plain HTTP export of a models directory serves too.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx
import trio

from . import metrics, names
from .config import Config
from .transport import Pool, Response, Timeout, TransportError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "modelfs"


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


def blob_url(template: str, base: str, name: str) -> str:
    """The URL of model `name` on router `base`. A `{name}` that ends the template is one path segment, its `/`
    encoded (llmlb's `/v0/models/blob/{name}` route); followed by more path it is a path (`{name}/model.gguf`)."""
    safe = "" if template.endswith("{name}") else "/"
    return template.format(router=base, name=quote(names.validate(name), safe=safe))


class Router:
    """All configured routers, with failover. Metadata calls are async (trio); blob GETs are blocking."""

    def __init__(self, config: Config) -> None:
        self.urls = config.router
        self.retries = config.retries
        self.download_streams = config.download_streams  # ranged GETs at once per model, at most
        self.download_part_size = config.download_part_size
        self.template = config.blob_url
        self.states = {url: RouterState(url) for url in self.urls}
        self._origins = {_origin(url) for url in self.urls}
        self._headers = {"User-Agent": USER_AGENT}
        if config.router_token:
            self._headers["Authorization"] = f"Bearer {config.router_token}"
        # One trust store for both clients: the system's, or SSL_CERT_FILE / SSL_CERT_DIR.
        context = ssl.create_default_context()
        # Metadata must answer fast (a lookup waits on it); bodies may stall up to read_timeout.
        timeout = httpx.Timeout(min(config.read_timeout, 5.0), connect=config.connect_timeout)
        self.aclient = httpx.AsyncClient(headers=self._headers, timeout=timeout, follow_redirects=False,
                                         verify=context)
        self.pool = Pool(context, config.connect_timeout, config.read_timeout, USER_AGENT)

    async def aclose(self) -> None:
        await self.aclient.aclose()
        self.pool.close()

    def blob_url(self, base: str, name: str) -> str:
        return blob_url(self.template, base, name)

    def _note(self, base: str, status: str) -> None:
        metrics.ROUTER_REQUESTS.labels(router=base, status=metrics.router_status(status)).inc()
        state = self.states[base]
        state.last_status = status
        state.last_time = time.time()

    def _next_url(self, url: str, status: int, location: str | None) -> str:
        """Where a redirect points, if it stays on a configured router; RouterError otherwise."""
        if not location:
            raise RouterError(f"{url}: redirect {status} without Location")
        target = urljoin(url, location)
        if _origin(target) not in self._origins:
            raise RouterError(f"{url}: refusing redirect to {target}: modelfs contacts only the configured routers")
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
                    url = self._next_url(url, response.status_code, response.headers.get("location"))
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
                message = describe(exc)
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
                self._note(base, describe(exc))
                log.info("router %s: cannot list models (%s)", base, describe(exc))
                errors.append(f"{base}: {describe(exc)}")
        if len(errors) == len(self.urls):
            raise RouterError("no router listed its models: " + "; ".join(errors))
        return found

    @contextmanager
    def stream(self, name: str, headers: dict[str, str]) -> Iterator[Response]:
        """Open the blob GET of `name` on the first router that serves it; blocking, for a worker thread.

        The answer is a 200, 206 or 416 (the caller judges which); NotFound if every router that answered said
        404, RouterError if none could serve it.
        """
        errors: list[str] = []
        saw_404 = False
        for base in self.urls:
            try:
                response = self._get(self.blob_url(base, name), headers)
                if response.status == 404:
                    response.close()
                    self._note(base, "404")
                    saw_404 = True
                    continue
                if response.status not in (200, 206, 416):
                    response.close()
                    raise RouterError(f"HTTP {response.status}")
            except (TransportError, RouterError) as exc:
                message = describe(exc)
                self._note(base, message)
                errors.append(f"{base}: {message}")
                continue
            self._note(base, str(response.status))
            try:
                yield response
            finally:
                response.close()
            return
        if saw_404 and not errors:
            raise NotFound(name)
        raise RouterError(f"model {name!r}: " + "; ".join(errors or ["no router configured"]))

    def _get(self, url: str, headers: dict[str, str]) -> Response:
        """GET with the router's headers, following redirects that stay on a configured router."""
        for _ in range(MAX_REDIRECTS + 1):
            response = self.pool.get(url, {**self._headers, **headers})
            if response.status not in REDIRECTS:
                return response
            response.close()
            url = self._next_url(url, response.status, response.headers.get("location"))
        raise RouterError(f"{url}: more than {MAX_REDIRECTS} redirects")


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


def describe(exc: Exception) -> str:
    """A short reason for a log line; never includes request headers (the API key)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, Timeout):
        return f"timed out ({exc})"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)
