"""What the test router's control API sets and reads: the injected faults (thread-safe, waking requests held by a
`hang` when they change) and the request log with byte counters that tests assert on.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Faults:
    """Injected misbehaviour; every field optional, None/False/0 = behave normally."""

    status: int | None = None
    fail_first: int = 0
    rate: float | None = None
    truncate_after: int | None = None
    truncate_times: int | None = None
    hang: bool = False
    hang_body_after: int | None = None
    redirect: str | None = None
    list_status: int | None = None
    list_hang: bool = False
    models: list[str] | None = None
    headers: dict[str, str] | None = None  # extra blob response headers (e.g. a digest)
    list_sizes: bool = True  # False: the model list has no size_bytes (llmlb may list models so)
    list_extra: list[str] | None = None  # names the model list shows although they have no file (blob: 404)


FAULT_FIELDS = {f.name for f in dataclasses.fields(Faults)}


class FaultState:
    """Thread-safe fault settings; the condition wakes hung requests when faults change or on stop."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.faults = Faults()
        self.stopping = False

    def update(self, changes: dict[str, Any]) -> None:
        """Merge fields; a null value restores that field's default."""
        unknown = set(changes) - FAULT_FIELDS
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        defaults = Faults()
        with self.cond:
            for key, value in changes.items():
                setattr(self.faults, key, getattr(defaults, key) if value is None else value)
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.faults = Faults()
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def applies(self, name: str) -> bool:
        models = self.faults.models
        return models is None or name in models

    def get(self, field: str, name: str) -> Any:
        """Current value of a blob fault for this model (default if it does not apply)."""
        with self.cond:
            if self.applies(name):
                return getattr(self.faults, field)
            return getattr(Faults(), field)

    def take_fail_first(self, name: str) -> bool:
        """Consume one of the `fail_first` failures if it applies to this model."""
        with self.cond:
            if self.faults.fail_first > 0 and self.applies(name):
                self.faults.fail_first -= 1
                return True
            return False

    def take_truncation(self, name: str, body_len: int) -> int | None:
        """Bytes to send before cutting the body, consuming one of `truncate_times`."""
        with self.cond:
            limit = self.faults.truncate_after
            if limit is None or limit >= body_len or not self.applies(name):
                return None
            if self.faults.truncate_times is not None:
                if self.faults.truncate_times <= 0:
                    return None
                self.faults.truncate_times -= 1
            return limit

    def wait_while(self, still_faulty: Callable[[Faults], bool]) -> None:
        """Block (holding the client's socket) until the fault is cleared or the server stops."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or not still_faulty(self.faults))


class Stats:
    """Request log and byte counters that tests assert on via GET /_stats."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.bytes_sent: dict[str, int] = {}
        self.blob_gets: dict[str, int] = {}
        self.connections = 0  # TCP connections that carried model API (/v0/) requests

    def reset(self) -> None:
        with self.lock:
            self.requests = []
            self.bytes_sent = {}
            self.blob_gets = {}
            self.connections = 0

    def connected(self) -> None:
        with self.lock:
            self.connections += 1

    def new_request(self, record: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append(record)
            name = record["name"]
            if record["method"] == "GET" and name is not None:
                self.blob_gets[name] = self.blob_gets.get(name, 0) + 1
        return record

    def add_bytes(self, record: dict[str, Any], n: int) -> None:
        with self.lock:
            record["bytes_sent"] += n
            name = record["name"]
            if name is not None:
                self.bytes_sent[name] = self.bytes_sent.get(name, 0) + n

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": [dict(r) for r in self.requests],
                "bytes_sent": dict(self.bytes_sent),
                "blob_gets": dict(self.blob_gets),
                "connections": self.connections,
            }
