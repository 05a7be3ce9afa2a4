"""Every Prometheus metric of the daemon, in one registry of its own, and the HTTP server that exposes them.

Modules import the metric objects from here and only ever `inc`/`observe`/`set` them: the names, help texts and
label sets live in this one file, so they stay consistent with the Prometheus conventions (`modelfs_` prefix,
base units, `_total` counters, labels from small fixed sets, never a model name). The registry is our own, not
prometheus_client's global one, so nothing else in the process (or a second daemon in a test) mixes in. The
server (`--metrics HOST:PORT`) is prometheus_client's, in a daemon thread: a scrape reads only these metric objects
(thread-safe) and the patched pyfuse3's counts of requests it answered in C (plain integers it keeps), never the
daemon's own state. Gauges are set by the code that owns their value, when it changes
(shared-directory health) or every second (store usage, see `quota`): no gauge calls back into the daemon.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from . import creads
from .errors import Reason

REGISTRY = CollectorRegistry(auto_describe=True)

#: Labels of `modelfs_downloads_failed_total`: why a download ended without a model (errors.Reason).
FAILURE_REASONS = tuple(reason.value for reason in Reason)
#: Labels of `modelfs_router_requests_total{status}`: status classes, or what went wrong before any status.
ROUTER_STATUSES = ("2xx", "3xx", "4xx", "5xx", "timeout", "error")
#: Labels of `modelfs_passthrough_fallbacks_total{cause}`: why an open took the daemon path although passthrough is
#: active. The errno names are what the kernel's FUSE_DEV_IOC_BACKING_OPEN (or the program's limits) can return.
FALLBACK_CAUSES = ("no_shared_mmap", "EOPNOTSUPP", "ELOOP", "EPERM", "EMFILE", "ENFILE", "ENOMEM", "ENOSPC", "other")

OPENS = Counter("modelfs_opens_total", "Files opened through the mount, by the source that served them.",
                ["source"], registry=REGISTRY)
MISSES = Counter("modelfs_misses_total", "Lookups or opens of a model no source has (ENOENT).", registry=REGISTRY)
DAEMON_READ_BYTES = Counter("modelfs_daemon_read_bytes_total",
                            "Bytes the daemon served to read requests in Python (not counting the kernel's page "
                            "cache, passthrough, or reads answered in C).", registry=REGISTRY)
PASSTHROUGH_OPENS = Counter("modelfs_passthrough_opens_total",
                            "Opens served by FUSE passthrough: the kernel reads the backing file itself.",
                            registry=REGISTRY)
PASSTHROUGH_FALLBACKS = Counter("modelfs_passthrough_fallbacks_total",
                                "Opens of complete files served by the daemon path although passthrough is active, "
                                "by cause.", ["cause"], registry=REGISTRY)
DOWNLOADS_STARTED = Counter("modelfs_downloads_started_total", "Downloads from a router started.",
                            registry=REGISTRY)
DOWNLOADS_COMPLETED = Counter("modelfs_downloads_completed_total",
                              "Downloads verified and promoted into the store.", registry=REGISTRY)
DOWNLOADS_FAILED = Counter("modelfs_downloads_failed_total", "Downloads that ended without a model, by reason.",
                           ["reason"], registry=REGISTRY)
DOWNLOAD_BYTES = Counter("modelfs_download_bytes_total", "Bytes fetched from routers by downloads.",
                         registry=REGISTRY)
DOWNLOAD_SECONDS = Histogram("modelfs_download_seconds", "Wall time of a download, start to promotion or failure.",
                             buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
                             registry=REGISTRY)
ROUTER_REQUESTS = Counter("modelfs_router_requests_total", "Requests to routers, by router and status class.",
                          ["router", "status"], registry=REGISTRY)
SHARED_AVAILABLE = Gauge("modelfs_shared_available", "1 while a shared directory answers, 0 while it is skipped.",
                         ["dir"], registry=REGISTRY)
SHARED_OUTAGES = Counter("modelfs_shared_outages_total", "Times a shared directory was marked unavailable.",
                         ["dir"], registry=REGISTRY)
STORE_BYTES = Gauge("modelfs_store_bytes", "Bytes of models and partial downloads in the local store.",
                    registry=REGISTRY)
STORE_QUOTA_BYTES = Gauge("modelfs_store_quota_bytes", "The store quota (store_max_size); 0 when there is none.",
                          registry=REGISTRY)
EVICTIONS = Counter("modelfs_evictions_total", "Downloaded models evicted to keep the store under its quota.",
                    registry=REGISTRY)


class _CAnswers(Collector):
    """Requests the patched pyfuse3 answers in C never reach Python: their counts are read at scrape time."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = creads.counts()
        yield CounterMetricFamily("modelfs_daemon_c_read_bytes", "Bytes of local files the daemon served to read "
                                  "requests in C, without Python (patched pyfuse3).", value=counts["read_bytes"])
        yield CounterMetricFamily("modelfs_daemon_range_read_bytes", "Bytes of downloads in progress the daemon "
                                  "replied to read requests from the partial file in C, once Python had waited for "
                                  "them (patched pyfuse3).", value=counts["range_bytes"])
        yield CounterMetricFamily("modelfs_xattr_c_enodata", "getxattr requests for names modelfs does not serve, "
                                  "answered with ENODATA in C.", value=counts["xattr_enodata"])


REGISTRY.register(_CAnswers())


def download_finished(reason: Reason | None, fetched: int, seconds: float) -> None:
    """Count one download's outcome (None: promoted): called once per download, where the fetcher logs it."""
    DOWNLOAD_BYTES.inc(max(fetched, 0))
    DOWNLOAD_SECONDS.observe(seconds)
    if reason is None:
        DOWNLOADS_COMPLETED.inc()
    else:
        DOWNLOADS_FAILED.labels(reason=reason.value).inc()


def router_status(status: str) -> str:
    """The `status` label for what one router request ended with (`200`, `HTTP 503`, `timed out …`, …)."""
    code = status.removeprefix("HTTP ")
    if code.isdigit() and len(code) == 3 and code[0] in "2345":
        return f"{code[0]}xx"
    if status == "list ok":
        return "2xx"
    if status.startswith("timed out"):
        return "timeout"
    return "error"


def fallback_cause(err: int | None) -> str:
    """The `cause` label of a passthrough fallback: the errno's name, or `no_shared_mmap` (err None)."""
    if err is None:
        return "no_shared_mmap"
    name = errno.errorcode.get(err, "")
    return name if name in FALLBACK_CAUSES else "other"


def init_labels(shared: list[str], quota: int | None) -> None:
    """Make every labelled series exist from the start (a counter that never moved still shows 0, so alerts on
    `rate()` and `increase()` work)."""
    for source in ("local", "shared", "router"):
        OPENS.labels(source=source)
    for reason in FAILURE_REASONS:
        DOWNLOADS_FAILED.labels(reason=reason)
    for cause in FALLBACK_CAUSES:
        PASSTHROUGH_FALLBACKS.labels(cause=cause)
    for directory in shared:
        SHARED_OUTAGES.labels(dir=directory)
    STORE_QUOTA_BYTES.set(quota or 0)


class MetricsServer:
    """prometheus_client's HTTP server for REGISTRY on `host:port`, in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
