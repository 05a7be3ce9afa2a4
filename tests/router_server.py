"""Stand-in for the llmlb router's model API (GET/HEAD /v0/models/blob/<name>, GET /v0/models)
with injectable faults, run as a real subprocess by tests; stdlib only.
Owns the HTTP server (`python tests/router_server.py --models-dir DIR ...`) and `RouterProcess`.
"""
from __future__ import annotations

import argparse
import dataclasses
import email.utils
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from procs import stop_process

BLOB_PREFIX = "/v0/models/blob/"
LIST_PATH = "/v0/models"
CHUNK = 256 * 1024
SENDFILE_STEP = 8 * 1024 * 1024  # bounded so stats stay live during big transfers
_NAME_RE = re.compile(r"^[a-z0-9_.\-/]+$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DISCONNECT_ERRORS = (ConnectionError, TimeoutError)


# --------------------------------------------------------------------------- helpers


def valid_name(name: str) -> bool:
    """llmlb model names: a-z 0-9 - _ . / with no empty, '.' or '..' segment."""
    if not _NAME_RE.match(name):
        return False
    return all(seg not in ("", ".", "..") for seg in name.split("/"))


def model_file(models_dir: Path, name: str) -> Path:
    """llmlb layout: model `org/m` lives at DIR/org/m/model.gguf."""
    return models_dir.joinpath(*name.split("/"), "model.gguf")


def list_models(models_dir: Path) -> list[tuple[str, int]]:
    """(name, size) of every non-empty model.gguf under the dir, sorted by name."""
    found: list[tuple[str, int]] = []
    for root, _dirs, files in os.walk(models_dir):
        if "model.gguf" not in files:
            continue
        name = Path(root).relative_to(models_dir).as_posix()
        try:
            st = os.stat(os.path.join(root, "model.gguf"))  # follows symlinks on purpose
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size > 0 and valid_name(name):
            found.append((name, st.st_size))
    return sorted(found)


class Unsatisfiable(Exception):
    """Range starts beyond the end of the file (-> 416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end_inclusive) for a single byte range; None means ignore it and send 200."""
    m = _RANGE_RE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix range: last N bytes
        n = int(last)
        if n == 0:
            raise Unsatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid -> RFC 9110 says ignore
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)


# --------------------------------------------------------------------------- fault state


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

    def reset(self) -> None:
        with self.lock:
            self.requests = []
            self.bytes_sent = {}
            self.blob_gets = {}

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
            }


# --------------------------------------------------------------------------- server


class RouterServer(ThreadingHTTPServer):
    """Threaded so a hung request never blocks the others."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], models_dir: Path, flavour: str,
                 token: str | None, list_format: str) -> None:
        super().__init__(addr, RouterHandler)
        self.models_dir = models_dir
        self.flavour = flavour
        self.token = token
        self.list_format = list_format
        self.faults = FaultState()
        self.stats = Stats()

    def server_close(self) -> None:
        self.faults.stop()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line for client disconnects instead of a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECT_ERRORS):
            sys.stderr.write(f"{client_address[0]}:{client_address[1]} disconnected: {exc!r}\n")
        else:
            super().handle_error(request, client_address)


class RouterHandler(BaseHTTPRequestHandler):
    """llmlb model API + /_control, /_stats, /_reset."""

    protocol_version = "HTTP/1.1"
    server: RouterServer
    server_version = "router-test/1"
    record: dict[str, Any] | None = None

    # ---- plumbing

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: we log one line per request ourselves, after the body."""

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")
        sys.stderr.flush()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        """Route, swallow client disconnects, log one line."""
        started = time.monotonic()
        self.record = None
        note = ""
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path.startswith("/_"):
                self._control(path)
            elif path.startswith("/v0/"):
                self._v0(path)
            else:
                self._send_json(404, {"error": f"Not found: {path}"})
        except _DISCONNECT_ERRORS as exc:
            self.close_connection = True
            note = f" (client disconnected: {type(exc).__name__})"
        if self.record is not None:
            r = self.record
            self.log_message('"%s %s" %s %d bytes %.3fs%s', self.command, self.path, r["status"],
                             r["bytes_sent"], time.monotonic() - started, note)
        elif note:
            self.log_message('"%s %s"%s', self.command, self.path, note)

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.record is not None:
            self.record["status"] = status

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send_head(status, {"Content-Type": "application/json",
                                 "Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self._write(body)

    def _write(self, data: bytes | memoryview) -> None:
        """send() loop so bytes_sent stays truthful even if the client vanishes midway."""
        view = memoryview(data)
        while view:
            n = self.connection.send(view)
            if self.record is not None:
                self.server.stats.add_bytes(self.record, n)
            view = view[n:]

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # ---- control API (test-only)

    def _control(self, path: str) -> None:
        if path == "/_stats" and self.command == "GET":
            self._send_json(200, self.server.stats.snapshot())
        elif path == "/_reset" and self.command == "POST":
            self._read_body()
            self.server.stats.reset()
            self.server.faults.reset()
            self._send_json(200, {"ok": True})
        elif path == "/_control" and self.command == "POST":
            try:
                changes = json.loads(self._read_body() or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                self.server.faults.update(changes)
            except ValueError as exc:
                self._send_json(400, {"error": str(exc)})
                return
            self._send_json(200, dataclasses.asdict(self.server.faults.faults))
        else:
            self._send_json(404, {"error": f"Not found: {path}"})

    # ---- llmlb API

    def _credential(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth and auth.startswith("Bearer "):
            return auth[len("Bearer "):]
        return self.headers.get("X-API-Key")

    def _v0(self, path: str) -> None:
        name = urllib.parse.unquote(path[len(BLOB_PREFIX):]) if path.startswith(BLOB_PREFIX) else None
        credential = self._credential()
        self.record = self.server.stats.new_request({
            "method": self.command, "path": self.path, "name": name,
            "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range"),
            "status": None, "bytes_sent": 0, "auth": credential,
        })
        if self.server.token is not None and credential != self.server.token:
            self._send_json(401, {"error": "Unauthorized"}, {"WWW-Authenticate": "Bearer"})
        elif name is not None and self.command in ("GET", "HEAD"):
            self._blob(name)
        elif path.rstrip("/") == LIST_PATH and self.command == "GET":
            self._list()
        else:
            self._send_json(404, {"error": f"Not found: {path}"})

    def _list(self) -> None:
        faults = self.server.faults
        if faults.faults.list_hang:
            faults.wait_while(lambda f: f.list_hang)
            self.close_connection = True
            return
        if faults.faults.list_status is not None:
            status = faults.faults.list_status
            self._send_json(status, {"error": f"injected status {status}"})
            return
        models: list[tuple[str, int | None]] = [*list_models(self.server.models_dir),
                                                *((n, None) for n in faults.faults.list_extra or ())]
        key = "name" if self.server.list_format == "array" else "id"
        entries = [{key: n, "status": "ready"} for n, _ in models]
        if faults.faults.list_sizes:
            for entry, (_, size) in zip(entries, models, strict=True):
                entry["size_bytes"] = size
        self._send_json(200, entries if self.server.list_format == "array" else {"data": entries})

    def _blob(self, name: str) -> None:
        if not valid_name(name):
            self._send_json(400, {"error": f"Invalid model name: {name}"})
            return
        faults = self.server.faults
        if faults.get("hang", name):
            faults.wait_while(lambda f: f.hang and (f.models is None or name in f.models))
            self.close_connection = True
            return
        status = faults.get("status", name)
        if status is not None:
            msg = f"Model not found: {name}" if status == 404 else f"injected status {status}"
            self._send_json(status, {"error": msg})
            return
        if faults.take_fail_first(name):
            self._send_json(500, {"error": "injected failure (fail_first)"})
            return
        redirect = faults.get("redirect", name)
        if redirect:
            location = redirect.rstrip("/") + BLOB_PREFIX + urllib.parse.quote(name, safe="/")
            self._send_json(302, {"location": location}, {"Location": location})
            return

        try:
            fh = open(model_file(self.server.models_dir, name), "rb")
        except OSError:  # missing, or a directory
            self._send_json(404, {"error": f"Model not found: {name}"})
            return
        with fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                self._send_json(404, {"error": f"Model not found: {name}"})
                return
            self._serve_file(fh, name, st)

    def _serve_file(self, fh: BinaryIO, name: str, st: os.stat_result) -> None:
        size = st.st_size
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Disposition": 'attachment; filename="model.gguf"'}
        headers.update(self.server.faults.get("headers", name) or {})
        start, end, status = 0, size - 1, 200
        if self.server.flavour == "range":
            etag = f'"{size}-{st.st_mtime_ns}"'
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            headers.update({"ETag": etag, "Last-Modified": last_modified, "Accept-Ranges": "bytes"})
            range_header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if range_header and (if_range is None or if_range in (etag, last_modified)):
                try:
                    parsed = parse_range(range_header, size)
                except Unsatisfiable:
                    self._send_json(416, {"error": "Range Not Satisfiable"},
                                    {**headers, "Content-Range": f"bytes */{size}"})
                    return
                if parsed is not None:
                    start, end = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        self._send_head(status, headers)
        if self.command == "HEAD":
            return
        self._send_body(fh.fileno(), name, start, length)

    def _send_body(self, fd: int, name: str, start: int, length: int) -> None:
        """Fast sendfile path unless a body fault (rate/truncate/hang_body_after) applies."""
        faults = self.server.faults
        truncate = faults.take_truncation(name, length)
        stall_after = faults.get("hang_body_after", name)
        if stall_after is not None and stall_after >= length:
            stall_after = None
        limit = min(x for x in (length, truncate, stall_after) if x is not None)

        if truncate is None and stall_after is None and not faults.get("rate", name):
            sent = self._sendfile(fd, start, length)
        else:
            sent = self._send_slow(fd, name, start, limit)

        if sent < length:  # truncated, stalled, or the file shrank underneath us
            if stall_after is not None and sent == stall_after:
                faults.wait_while(lambda f: f.hang_body_after is not None
                                  and (f.models is None or name in f.models))
            self.close_connection = True

    def _sendfile(self, fd: int, start: int, length: int) -> int:
        sent = 0
        sock_fd = self.connection.fileno()
        while sent < length:
            n = os.sendfile(sock_fd, fd, start + sent, min(SENDFILE_STEP, length - sent))
            if n == 0:
                break
            sent += n
            assert self.record is not None
            self.server.stats.add_bytes(self.record, n)
        return sent

    def _send_slow(self, fd: int, name: str, start: int, limit: int) -> int:
        """Chunked pread+send, throttled by the (live) `rate` fault."""
        sent = 0
        next_t = time.monotonic()
        while sent < limit:
            rate = self.server.faults.get("rate", name)
            step = CHUNK if not rate else max(1, min(CHUNK, int(rate / 20)))
            data = os.pread(fd, min(step, limit - sent), start + sent)
            if not data:
                break
            self._write(data)
            sent += len(data)
            if rate:
                now = time.monotonic()
                next_t = max(next_t, now - 0.05) + len(data) / rate
                if next_t > now:
                    time.sleep(next_t - now)
        return sent


def write_port_file(path: str, port: int) -> None:
    """Atomic (temp + rename) so the parent never reads a half-written port."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake llmlb router for modelfs tests")
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--flavour", choices=("llmlb", "range"), default="llmlb")
    parser.add_argument("--list-format", choices=("data", "array"), default="data")
    parser.add_argument("--token", default=None, help="prefer env ROUTER_TOKEN")
    parser.add_argument("--port-file", default=None)
    args = parser.parse_args(argv)

    token = args.token or os.environ.get("ROUTER_TOKEN") or None
    server = RouterServer((args.host, args.port), args.models_dir.resolve(), args.flavour,
                          token, args.list_format)
    port = server.server_address[1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write(f"router_server: {args.flavour} on http://{args.host}:{port} serving {args.models_dir}\n")
    sys.stderr.flush()
    if args.port_file:
        write_port_file(args.port_file, port)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --------------------------------------------------------------------------- test helper


class RouterProcess:
    """Runs router_server.py as a real subprocess for a test; use as a context manager."""

    def __init__(self, models_dir: str | os.PathLike[str], flavour: str = "llmlb",
                 token: str | None = None, list_format: str = "data",
                 host: str = "127.0.0.1", startup_timeout: float = 10.0) -> None:
        self.models_dir = Path(models_dir)
        self.host = host
        self._final_log: str | None = None
        self._tmp = tempfile.mkdtemp(prefix="router_server_")
        self.log_path = Path(self._tmp) / "stderr.log"
        port_file = Path(self._tmp) / "port"
        env = dict(os.environ)
        env.pop("ROUTER_TOKEN", None)
        if token is not None:
            env["ROUTER_TOKEN"] = token  # env, not argv: keeps it out of `ps`
        cmd = [sys.executable, str(Path(__file__).resolve()), "--models-dir", str(self.models_dir),
               "--host", host, "--port", "0", "--flavour", flavour,
               "--list-format", list_format, "--port-file", str(port_file)]
        # stderr to a file, not a PIPE: an unread pipe would eventually block the server.
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"router_server failed to start (rc={self.proc.returncode}):\n"
                                   f"{self.log_text()}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.url = f"http://{host}:{self.port}"

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def blob_url(self, name: str) -> str:
        return f"{self.url}{BLOB_PREFIX}{urllib.parse.quote(name, safe='/')}"

    def log_text(self) -> str:
        """The server's stderr so far (kept after stop() for failure messages)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path} -> {exc.code}: {exc.read()!r}") from None

    def control(self, **fault_fields: Any) -> dict[str, Any]:
        """Merge fault fields (None restores a default); returns the resulting fault state."""
        return self._call("POST", "/_control", fault_fields)

    def reset(self) -> None:
        """Clear all faults and stats."""
        self._call("POST", "/_reset", {})

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_stats")

    def bytes_sent(self, name: str) -> int:
        return int(self.stats()["bytes_sent"].get(name, 0))

    def blob_gets(self, name: str) -> int:
        return int(self.stats()["blob_gets"].get(name, 0))

    def stop(self) -> None:
        """Terminate, then kill after 5 s; idempotent."""
        stop_process(self.proc)
        if not self._log.closed:
            self._log.close()
            self._final_log = self.log_text()
        shutil.rmtree(self._tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
