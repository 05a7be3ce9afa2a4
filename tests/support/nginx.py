"""A real nginx of its own (not a daemon, its files in one prefix directory), in one of two roles: a shipped
caching proxy (systemd/nginx-modelfs-cache.conf for whole blobs, nginx-modelfs-slice.conf for slices) in front of a
test origin, or a plain file server of a models directory in the llmlb API and as a plain export, which honours
Range natively, optionally limited per connection.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tests.support.models import list_models
from tests.support.procs import free_port, stop_process, wait_port
from tests.support.router_server import BLOB_PREFIX

ROOT = Path(__file__).resolve().parents[2]
#: For an origin that ignores Range (llmlb's blob route): whole blobs, one cache entry each.
CACHE_CONF = ROOT / "systemd" / "nginx-modelfs-cache.conf"
#: For an origin that honours Range (a plain HTTP export): the slice module.
SLICE_CONF = ROOT / "systemd" / "nginx-modelfs-slice.conf"


def replace_once(pattern: str, replacement: str, text: str, what: str, flags: int = 0) -> str:
    """re.sub that insists on exactly one match: a shipped config that changed shape must fail loudly."""
    new, n = re.subn(pattern, replacement, text, flags=flags)
    if n != 1:
        raise AssertionError(f"{what}: {pattern!r} matched {n} times")
    return new


class Nginx:
    """nginx on 127.0.0.1:`port` with one `http {}` snippet (`Nginx.shipped`: the caching proxy; `Nginx.models`: a
    plain server of a models directory), logging each request's cache status, range and body size."""

    def __init__(self, prefix: Path, snippet: str, port: int) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        self._log_start = 0
        temp = prefix / "temp"
        temp.mkdir(exist_ok=True)
        # As root nginx's workers would run as nobody, who cannot enter pytest's 0700 tmp_path.
        (prefix / "nginx.conf").write_text(f"""\
user root root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {self.error_log} notice;
events {{ worker_connections 1024; }}
http {{
    log_format cache '$request_method $request_uri $status $upstream_cache_status range=$http_range '
                     'body=$body_bytes_sent';
    access_log {self.access_log} cache;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{snippet}
}}
""")
        self.stderr = prefix / "stderr.log"
        with open(self.stderr, "wb") as stderr:
            self.proc = subprocess.Popen(["nginx", "-c", str(prefix / "nginx.conf"), "-p", str(prefix),
                                          "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            wait_port(port, self.proc, "nginx")
        except RuntimeError as exc:
            self.stop()
            logs = [p.read_text(errors="replace") for p in (self.stderr, self.error_log) if p.exists()]
            raise RuntimeError(f"nginx did not start ({exc}):\n" + "\n".join(logs)) from None

    @classmethod
    def shipped(cls, prefix: Path, router_port: int, conf: Path = CACHE_CONF,
                overrides: dict[str, str] | None = None) -> Nginx:
        """The shipped caching proxy `conf`, its upstream the origin on `router_port`, its cache under `prefix`;
        `overrides` give directives other values (name -> value; each must occur exactly once)."""
        port = free_port()
        snippet = conf.read_text().replace("/var/cache/nginx/modelfs", str(prefix / "cache"))
        snippet = replace_once(r"upstream llmlb \{.*?\}", f"upstream llmlb {{\n    server 127.0.0.1:{router_port};\n}}",
                               snippet, f"{conf.name}'s upstream llmlb block", re.S)
        snippet = replace_once(r"listen 8080;", f"listen 127.0.0.1:{port};", snippet, f"{conf.name}'s listen")
        for name, value in (overrides or {}).items():
            snippet = replace_once(rf"(?m)^(\s*{re.escape(name)}) [^;]*;", rf"\g<1> {value};", snippet,
                                   f"{conf.name}'s {name}")
        return cls(prefix, snippet, port)

    @classmethod
    def models(cls, prefix: Path, models_dir: Path, limit_rate: str | None = None, model_list: bool = False,
               tls: tuple[Path, Path] | None = None) -> Nginx:
        """A plain server of `models_dir`, Range natively: in the llmlb API (`/v0/models/blob/<name>`, with
        `model_list` also `/v0/models` as of now) and as a plain export (`/<name>/model.gguf`); each connection
        limited to `limit_rate` (e.g. "2m") if given; over TLS with `tls` (certificate and key files)."""
        prefix.mkdir(parents=True, exist_ok=True)
        port = free_port()
        listing = ""
        if model_list:
            models = [{"id": name, "size_bytes": size} for name, size in list_models(models_dir)]
            (prefix / "models.json").write_text(json.dumps({"data": models}))
            listing = f"location = /v0/models {{ default_type application/json; alias {prefix}/models.json; }}"
        server = cls(prefix, f"""\
sendfile on;
server {{
    listen 127.0.0.1:{port}{" ssl" if tls else ""};
    {f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""}
    {f"limit_rate {limit_rate};" if limit_rate else ""}
    location ~ ^{BLOB_PREFIX}(.+)$ {{ alias {models_dir}/$1/model.gguf; }}
    {listing}
    location / {{ root {models_dir}; }}
}}
""", port)
        if tls:
            server.url = f"https://127.0.0.1:{port}"
        return server

    def log_lines(self, uri: str) -> list[str]:
        """Access log lines of requests for `uri` (as sent, percent-encoded)."""
        return [line for line in self.access_log.read_text().splitlines() if f" {uri} " in line]

    def reset(self) -> None:
        """Count requests and bytes from now on (`blob_gets`, `bytes_sent`)."""
        self._log_start = self.access_log.stat().st_size if self.access_log.exists() else 0

    def _model_gets(self, name: str) -> list[int]:
        """Body bytes of each GET of model `name` since `reset()`, at llmlb's blob route or at a plain export's
        path, from the access log (written when a request ends)."""
        if not self.access_log.exists():
            return []
        with open(self.access_log, "rb") as log:
            log.seek(self._log_start)
            lines = log.read().decode(errors="replace").splitlines()
        wanted = (BLOB_PREFIX + name, f"/{name}/model.gguf")
        return [int(line.rpartition("body=")[2]) for line in lines
                if line.startswith("GET ") and urllib.parse.unquote(line.split()[1]) in wanted]  # %2F or /

    def blob_gets(self, name: str) -> int:
        """GETs of model `name` since `reset()` (as the test router counts them)."""
        return len(self._model_gets(name))

    def bytes_sent(self, name: str) -> int:
        """Body bytes sent for model `name` since `reset()` (as the test router counts them)."""
        return sum(self._model_gets(name))

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_nginx(make: Callable[[], Nginx]) -> Nginx:
    """`make()`, tried up to three times: the free port it picked may have been taken meanwhile."""
    for attempt in range(3):
        try:
            return make()
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
