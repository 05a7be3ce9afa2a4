"""A real squid of its own (`squid -N`, never the system's service), in one of two roles: the shipped caching
reverse proxy (systemd/squid-modelfs-cache.conf) in front of a test origin, or a plain forward proxy that only
relays CONNECT tunnels, as a node behind a corporate proxy meets it. Its files live in a directory of its own
under /tmp, owned by the `proxy` user squid drops to (pytest's 0700 tmp_path is root's alone); stop() removes it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tests.support.nginx import ROOT, replace_once
from tests.support.procs import free_port, stop_process, wait_port
from tests.support.router_server import BLOB_PREFIX

SQUID_CONF = ROOT / "systemd" / "squid-modelfs-cache.conf"


class Squid:
    """squid on 127.0.0.1:`port` with the configuration `render(port, prefix)` returns, plus its own files (pid,
    logs) under `prefix`. `Squid.shipped`: the caching reverse proxy; `Squid.forward`: a CONNECT-only proxy."""

    def __init__(self, render: Callable[[int, Path], str], cache: bool = False) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="modelfs-squid-"))
        shutil.chown(self.prefix, "proxy", "proxy")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = self.prefix / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None
        conf = self.prefix / "squid.conf"
        conf.write_text(render(self.port, self.prefix) + f"""
access_log stdio:{self.access_log} squid
cache_log {self.prefix}/cache.log
pid_filename {self.prefix}/squid.pid
coredump_dir {self.prefix}
cache_effective_user proxy
shutdown_lifetime 1 second
""")
        # A service name of its own: squid names its shared-memory segments after it, so squids running at once
        # (other tests, other engineers) never collide.
        command = ["squid", "-N", "-n", f"modelfs{self.port}", "-f", str(conf)]
        if cache:
            made = subprocess.run([*command, "-z"], capture_output=True, text=True, timeout=60)
            if made.returncode != 0:
                self.stop()
                raise RuntimeError(f"squid -z failed:\n{made.stdout}{made.stderr}")
        with open(self.prefix / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            wait_port(self.port, self.proc, "squid", timeout=15)
        except RuntimeError as exc:
            logs = [p.read_text(errors="replace")[-2000:] for p in (self.prefix / "stderr.log",
                                                                    self.prefix / "cache.log") if p.exists()]
            self.stop()
            raise RuntimeError(f"squid did not start ({exc}):\n" + "\n".join(logs)) from None

    @classmethod
    def shipped(cls, origin_port: int, conf: Path = SQUID_CONF, overrides: dict[str, str] | None = None) -> Squid:
        """The shipped squid.conf `conf`, its parent the origin on `origin_port`, its cache in its own directory;
        `overrides` give directives other values (name -> value; each must occur exactly once)."""

        def render(port: int, prefix: Path) -> str:
            text = conf.read_text()
            for pattern, value, what in (
                (r"(?m)^http_port 3128 ", f"http_port 127.0.0.1:{port} ", "http_port"),
                (r"(?m)^cache_peer router-a parent 8080 ", f"cache_peer 127.0.0.1 parent {origin_port} ",
                 "the first cache_peer"),
                (r"(?m)^cache_peer router-b .*\n", "", "the standby cache_peer"),
                (r"(?m)^cache_dir aufs /var/spool/squid/modelfs \d+ ", f"cache_dir aufs {prefix}/cache 20000 ",
                 "cache_dir"),
                (r"(?m)^access_log .*\n", "", "access_log"),
                (r"(?m)^coredump_dir .*\n", "", "coredump_dir"),
                *((rf"(?m)^{re.escape(name)} .*$", f"{name} {value}", name) for name, value in
                  (overrides or {}).items()),
            ):
                text = replace_once(pattern, value, text, f"{conf.name}'s {what}")
            return text

        return cls(render, cache=True)

    @classmethod
    def forward(cls) -> Squid:
        """A forward proxy for 127.0.0.1 that relays CONNECT tunnels (to any port) and caches nothing."""
        return cls(lambda port, _prefix: f"""\
http_port 127.0.0.1:{port}
acl CONNECT method CONNECT
http_access allow localhost
http_access deny all
cache deny all
""")

    def log_lines(self) -> list[str]:
        """The access log so far (squid's native format: ... code/status bytes method URL ...)."""
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def model_gets(self, name: str) -> list[str]:
        """Access log lines of GETs of model `name`, at llmlb's blob route or at a plain export's path."""
        wanted = (BLOB_PREFIX + name, f"/{name}/model.gguf")
        return [line for line in self.log_lines() if len(fields := line.split()) > 6 and fields[5] == "GET"
                and urllib.parse.unquote(urllib.parse.urlsplit(fields[6]).path) in wanted]

    def blob_gets(self, name: str) -> int:
        """GETs of model `name` the nodes sent to squid."""
        return len(self.model_gets(name))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> Squid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
