"""The test router: a stand-in for the llmlb router's model API (GET/HEAD /v0/models/blob/<name>, GET
/v0/models) with injectable faults, run as a real process (`python -m tests.support.router_server --models-dir
DIR ...`, started by `tests.support.router.RouterProcess`); stdlib only. Flavour `llmlb` ignores Range as llmlb
does; `range` honours Range and If-Range with an ETag, as a plain file server would.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import json
import os
import re
import signal
import stat
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from tests.support.models import list_models, model_file, valid_name
from tests.support.router_state import FaultState, Stats

BLOB_PREFIX = "/v0/models/blob/"
LIST_PATH = "/v0/models"
CHUNK = 256 * 1024
SENDFILE_STEP = 8 * 1024 * 1024  # bounded so stats stay live during big transfers
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DISCONNECT_ERRORS = (ConnectionError, TimeoutError)


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

    def setup(self) -> None:
        """Once per accepted connection (a kept-alive one carries several requests)."""
        super().setup()
        self.counted = False  # whether this connection carried a model API request yet

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
        if not self.counted:
            self.server.stats.connected()
            self.counted = True
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
        entries: list[dict[str, str | int | None]] = [{key: n, "status": "ready"} for n, _ in models]
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


if __name__ == "__main__":
    sys.exit(main())
