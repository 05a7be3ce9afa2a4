"""Configuration: defaults < llmlb node variables < TOML file < MODELFS_* environment < command-line flags.

Everything ends up in one frozen `Config`; every bad key or value is a `ConfigError` that names it, so an admin
sees exactly which line to fix. The llmlb node's variables are honoured as fallbacks for drop-in use; its removed
auto-repair variables are ignored without a word, as llmlb itself does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A setting that cannot be used; the message names the setting and where it came from."""


def default_store() -> Path:
    """Where downloaded models live when nothing says otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/modelfs/store")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(base) / "modelfs/store"


@dataclass(frozen=True)
class Config:
    """All settings of one mount. Field names are the TOML keys; MODELFS_<FIELD> are the env names."""

    store: Path = field(default_factory=default_store)
    shared: tuple[Path, ...] = ()
    router: tuple[str, ...] = ()
    router_token: str | None = dataclasses.field(default=None, repr=False)
    blob_url: str = "{router}/v0/models/blob/{name}"
    shared_timeout: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3
    negative_cache_ttl: float = 2.0
    router_list_ttl: float = 10.0
    store_max_size: int | None = None
    read_ahead_kb: int = 4096
    download_streams: int = 8
    download_part_size: int = 8 << 20
    drop_backing_cache: bool = True
    passthrough: str = "auto"
    allow_other: bool = False
    debug: bool = False
    metrics: tuple[str, int] | None = None  # serve Prometheus metrics on this (host, port)


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty path")
    return Path(value).expanduser().absolute()


def _paths(value: Any) -> tuple[Path, ...]:
    return tuple(_path(v) for v in _list(value))


def _list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("expected a list of strings (or a comma-separated string)")


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: a router URL has no query or fragment")
    return value.rstrip("/")


def _urls(value: Any) -> tuple[str, ...]:
    return tuple(_url(v) for v in _list(value))


def _blob_url(value: Any) -> str:
    """A template for where a model's bytes are: `{router}` then a path holding `{name}`, and nothing else."""
    if not isinstance(value, str):
        raise ValueError("expected a string such as {router}/v0/models/blob/{name}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    if {f for f in fields if f[0] not in ("router", "name") or f[1] or f[2]} or "{name}" not in value:
        raise ValueError(f"{value!r} must use {{name}} (and {{router}}), no other field")
    if any(c.isspace() for c in value):
        raise ValueError(f"{value!r}: a URL has no spaces")
    if not value.startswith("{router}/") or "#" in value or value.count("{router}") != 1:
        raise ValueError(f"{value!r} must start with {{router}}/ (modelfs contacts only the configured routers)")
    return value


def _positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("expected a positive number of seconds")
    return number


def _count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = int(value)
    if number < 0:
        raise ValueError("expected a whole number >= 0")
    return number


def _at_least(low: int, number: int) -> int:
    if number < low:
        raise ValueError(f"expected at least {low}")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _passthrough(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("auto", "on", "off"):
        raise ValueError("expected auto, on or off")
    return text


def _address(value: Any) -> tuple[str, int] | None:
    """`host:port` (IPv6 as `[::1]:9090`) for the metrics server; "" for none."""
    if not isinstance(value, str):
        raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
    if not value.strip():
        return None
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port with a port 1-65535, e.g. 127.0.0.1:9464")
    return host, int(port)


def _token(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value or None


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)


def parse_size(value: Any) -> int | None:
    """`200G`, `1.5T`, `500M`, a plain byte count, or 0/"" for no limit. Units are binary (G = GiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif str(value).strip() == "":
        return None
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise ValueError("expected a size such as 200G, 500M or a byte count")
        power = " kmgtp".index(match.group(2).lower() or " ")
        size = int(float(match.group(1)) * 1024**power)
    if size < 0:
        raise ValueError("expected a size >= 0")
    return size or None


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "store": _path,
    "shared": _paths,
    "router": _urls,
    "router_token": _token,
    "blob_url": _blob_url,
    "shared_timeout": _positive_float,
    "connect_timeout": _positive_float,
    "read_timeout": _positive_float,
    "retries": _count,
    "negative_cache_ttl": _positive_float,
    "router_list_ttl": _positive_float,
    "store_max_size": parse_size,
    "read_ahead_kb": _count,
    "download_streams": lambda value: _at_least(1, _count(value)),
    "download_part_size": lambda value: _at_least(1 << 20, parse_size(value) or 0),
    "drop_backing_cache": _bool,
    "passthrough": _passthrough,
    "allow_other": _bool,
    "debug": _bool,
    "metrics": _address,
}
assert set(_PARSERS) == {f.name for f in dataclasses.fields(Config)}

#: The llmlb node's own variables, honoured when nothing of ours sets the same thing.
LLMLB_FALLBACKS: dict[str, str] = {
    "LLM_NODE_MODELS_DIR": "store",
    "LLM_MODELS_DIR": "store",  # deprecated spelling
    "LLM_NODE_SHARED_MODELS_DIR": "shared",
    "LLM_SHARED_MODELS_DIR": "shared",  # deprecated spelling
    "LLM_ROUTER_URL": "router",
    "LLM_NODE_API_KEY": "router_token",
}


def _parse(key: str, value: Any, origin: str) -> Any:
    parser = _PARSERS.get(key)
    if parser is None:
        raise ConfigError(f"{origin}: unknown setting {key!r} (known: {', '.join(sorted(_PARSERS))})")
    try:
        return parser(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{origin}: bad value for {key!r}: {exc}") from None


def from_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file (flat table, keys as in `Config`)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return {key: _parse(key, value, f"config file {path}") for key, value in data.items()}


def from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MODELFS_* settings, llmlb fallback settings) from the environment."""
    ours: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith("MODELFS_") and name != "MODELFS_CONFIG" and not name.startswith("MODELFS_TEST_"):
            key = name[len("MODELFS_") :].lower()
            if key not in _PARSERS:
                # A service's environment is not all its own (wrappers set MODELFS_PID and the like): say so, go on.
                log.warning("ignoring environment variable %s: modelfs has no setting %r", name, key)
                continue
            ours[key] = _parse(key, value, f"environment variable {name}")
    fallback: dict[str, Any] = {}
    for name, key in LLMLB_FALLBACKS.items():
        if env.get(name) and key not in fallback:
            fallback[key] = _parse(key, env[name], f"environment variable {name}")
    return ours, fallback


def load(
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge every source; flags hold only what the user actually passed (None = not given)."""
    env = os.environ if env is None else env
    if config_file is None and env.get("MODELFS_CONFIG"):
        config_file = Path(env["MODELFS_CONFIG"])
    ours, fallback = from_env(env)
    merged: dict[str, Any] = dict(fallback)
    if config_file is not None:
        merged.update(from_file(config_file))
    merged.update(ours)
    for key, value in (flags or {}).items():
        if value is not None and value != ():
            merged[key] = _parse(key, value, f"option --{key.replace('_', '-')}")
    config = Config(**merged)
    _check_blob_url(config)
    return config


def _check_blob_url(config: Config) -> None:
    """Every model URL the template makes stays on its router's origin (scheme, host, port)."""
    for router in config.router:
        url = config.blob_url.format(router=router, name="org/model")
        if urlsplit(url)[:2] != urlsplit(router)[:2] or urlsplit(url).path.count("//"):
            raise ConfigError(f"setting 'blob_url': {config.blob_url!r} makes {url!r}, not a path on the router "
                              f"{router}")
