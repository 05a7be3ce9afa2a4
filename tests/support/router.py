"""The test router as a test (or the bench) holds it: `RouterProcess` starts tests/support/router_server.py as a
real process on a free loopback port, sets its faults and reads its request log through the control API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.procs import stop_process
from tests.support.router_server import BLOB_PREFIX

ROOT = Path(__file__).resolve().parents[2]


class RouterProcess:
    """The test router as a real process serving `models_dir` (llmlb layout); stopped by `stop()` or as a context
    manager. The token, if any, goes to the server in its environment, never on its command line."""

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
        # The server imports tests.support: the repository root on its path, whatever the caller's cwd.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        if token is not None:
            env["ROUTER_TOKEN"] = token  # env, not argv: keeps it out of `ps`
        cmd = [sys.executable, "-m", "tests.support.router_server", "--models-dir", str(self.models_dir),
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

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
                return answer
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

    def connections(self) -> int:
        """TCP connections that carried model API (/v0/) requests since start or the last reset(): a kept-alive
        connection counts once however many requests it carried; control calls (this one) never count."""
        return int(self.stats()["connections"])

    def stop(self) -> None:
        """Terminate, then kill after 5 s; idempotent."""
        stop_process(self.proc)
        if not self._log.closed:
            self._log.close()
            self._final_log = self.log_text()
        shutil.rmtree(self._tmp, ignore_errors=True)
