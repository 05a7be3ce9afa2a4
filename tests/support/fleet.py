"""A fleet's cold start, for real: a slow origin, a shipped caching proxy in front of it, and N modelfs nodes (each
its own daemon, mountpoint and store) opening the same model at once. Used by tests/test_fleet.py and bench.fleet.

Owns the cases (which proxy config in front of which kind of origin, and what the nodes ask for), starting their
origin and proxy (`Case.origin`, `Case.proxy`), and `herd`, which reads the model on every node at once and
reports what the origin sent (GETs, bytes) and how long the herd took.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.support.mount import Mount
from tests.support.nginx import CACHE_CONF, SLICE_CONF, Nginx, start_nginx
from tests.support.procs import eventually
from tests.support.router import RouterProcess
from tests.support.squid import SQUID_CONF, Squid

#: The blob URL template of nodes in front of a plain export: the export's own path, through the proxy.
EXPORT_BLOB_URL = "{router}/{name}/model.gguf"


class Origin(Protocol):
    """What the herd needs of an origin: the test router and a plain nginx export both count per model."""

    port: int

    def blob_gets(self, name: str) -> int: ...

    def bytes_sent(self, name: str) -> int: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Case:
    """A proxy config (a file in systemd/) in front of an origin: `llmlb` (the test router as llmlb's blob route:
    Range ignored, no validators), `range` (the same route honouring Range, with ETag and Last-Modified) or
    `export` (nginx serving the models directory, Range natively). Nodes in front of an export ask for its
    path (`blob_url`) unless `blob_route`: then the proxy maps llmlb's blob route onto it."""

    conf: Path
    origin_kind: str
    blob_route: bool = False

    @property
    def label(self) -> str:
        asked = " via the blob route" if self.blob_route else ""
        return f"{self.conf.name} / {self.origin_kind}{asked}"

    @property
    def is_squid(self) -> bool:
        return self.conf == SQUID_CONF

    def node_settings(self) -> dict[str, str]:
        """The nodes' MODELFS_* settings for this case."""
        return {"MODELFS_BLOB_URL": EXPORT_BLOB_URL} if self.origin_kind == "export" and not self.blob_route else {}

    def origin(self, models: Path, rate: float, prefix: Path) -> Origin:
        """The origin, each connection sending at most `rate` bytes/s."""
        if self.origin_kind == "export":
            return start_nginx(lambda: Nginx.models(prefix, models, limit_rate=str(int(rate))))
        router = RouterProcess(models, flavour=self.origin_kind)
        router.control(rate=rate)
        return router

    def proxy(self, origin_port: int, prefix: Path, overrides: dict[str, str] | None = None) -> Nginx | Squid:
        """The proxy from its shipped config, pointed at the origin; `overrides` as Nginx.shipped and
        Squid.shipped take them."""
        if self.is_squid:
            return Squid.shipped(origin_port, self.conf, overrides)
        return start_nginx(lambda: Nginx.shipped(prefix, origin_port, self.conf, overrides))


#: Each shipped config with the origin it is for; squid with all three (the export through its own path).
CASES = [Case(CACHE_CONF, "llmlb"), Case(SLICE_CONF, "export"), Case(SLICE_CONF, "export", blob_route=True),
         Case(SQUID_CONF, "llmlb"), Case(SQUID_CONF, "range"), Case(SQUID_CONF, "export")]


def start_nodes(count: int, root: Path, router_url: str, mounter: Callable[..., Mount],
                env: dict[str, str] | None = None) -> list[Mount]:
    """`count` modelfs daemons, each with its own mountpoint and store under `root`, all using `router_url`;
    `mounter` is the tests' `mount` fixture or the bench's equivalent."""
    nodes = []
    for i in range(count):
        mountpoint = root / f"node{i}" / "mnt"
        mountpoint.mkdir(parents=True)
        nodes.append(mounter("--router", router_url, mountpoint=mountpoint, store=root / f"node{i}" / "store",
                             env=env))
    return nodes


@dataclass
class Herd:
    """What one herd did: the origin's side and every node's."""

    size: int
    gets: int
    origin_bytes: int
    wall: float
    node_seconds: list[float]
    digests_ok: list[bool]
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Origin bytes as a multiple of the model."""
        return self.origin_bytes / self.size


def sha256_of(path: Path, chunk: int = 4 << 20) -> str:
    """The file's SHA-256, read in `chunk`-sized reads without Python's buffering (as a loader reads a model)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            digest.update(data)
    return digest.hexdigest()


def herd(nodes: list[Mount], name: str, expected_sha256: str, size: int, origin: Origin,
         timeout: float = 600) -> Herd:
    """Every node opens `name` and reads it to the end at once (one thread each, released together)."""
    before = origin.blob_gets(name), origin.bytes_sent(name)
    barrier = threading.Barrier(len(nodes) + 1)
    seconds: list[float] = [float("nan")] * len(nodes)
    ok = [False] * len(nodes)
    errors: list[str] = []

    def read(i: int) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            ok[i] = sha256_of(nodes[i].model(name)) == expected_sha256
        except OSError as exc:
            errors.append(f"node {i}: {exc}")
        seconds[i] = time.monotonic() - started

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(nodes))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.monotonic()
    for t in threads:
        t.join(timeout=max(1.0, timeout - (time.monotonic() - started)))
    wall = time.monotonic() - started
    if any(t.is_alive() for t in threads):
        errors.append(f"herd still reading after {timeout:.0f} s")
    return Herd(size, origin.blob_gets(name) - before[0], origin.bytes_sent(name) - before[1], wall, seconds, ok,
                errors)


def store_copy(node: Mount, name: str) -> Path:
    """Where a node keeps the downloaded model (llmlb layout)."""
    return node.store.joinpath(*name.split("/"), "model.gguf")


def settle(nodes: list[Mount], name: str, timeout: float = 60) -> list[bool]:
    """Whether each node's store holds the promoted model, waiting for downloads that are still verifying."""
    eventually(lambda: all(store_copy(n, name).exists() for n in nodes), timeout, interval=0.1)
    return [store_copy(n, name).exists() for n in nodes]
