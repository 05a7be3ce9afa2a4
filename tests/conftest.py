"""Fixtures: a real modelfs mount, test routers and nginx servers, each stopped at teardown; the I/O path a test
runs on. The components themselves live in tests/support; the fixtures only start and stop them per test.

`mount(...)` starts `modelfs mount --foreground` as a real process (so tests can kill -9 it), waits for the kernel
mount, and at teardown unmounts lazily and checks the daemon's log: a traceback or an ERROR line nobody declared
expected fails the test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes as gguf_bytes
from tests.support.models import write_model as write_model
from tests.support.mount import Mount as Mount
from tests.support.mount import fuse_missing as fuse_missing
from tests.support.nginx import Nginx, start_nginx
from tests.support.procs import wait_for as wait_for
from tests.support.router import RouterProcess


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("store", "shared", "shared2", "mnt")}
    for path in paths.values():
        path.mkdir()
    return paths


IO_PATHS = ("passthrough", "daemon")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `io_paths` run twice: with FUSE passthrough (`--passthrough on`: the mount fails rather than
    fall back silently) and on the daemon read path (`off`), so the fallback stays tested."""
    if metafunc.definition.get_closest_marker("io_paths") and "mount" in metafunc.fixturenames:
        if "io" not in metafunc.fixturenames:
            metafunc.fixturenames.append("io")
        metafunc.parametrize("io", IO_PATHS, indirect=True)


@pytest.fixture
def io(request: pytest.FixtureRequest) -> str:
    """The I/O path the test's mounts use: "passthrough", "daemon", or "auto" for unmarked tests."""
    return str(getattr(request, "param", "auto"))


@pytest.fixture
def mount(dirs: dict[str, Path], tmp_path: Path, router: object, request: pytest.FixtureRequest) -> Iterator[object]:
    """`mount(*args, mountpoint=None, store=None, env=None)` → a started Mount (`env`: MODELFS_* settings); all
    are stopped and their logs checked at teardown.

    Depends on `router` so that routers outlive the mounts that use them. Under the `io_paths` marker, every
    mount of the test uses the I/O path of its `io` parameter; otherwise the default (`auto`).
    """
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    mounts: list[Mount] = []
    callspec = getattr(request.node, "callspec", None)
    io = callspec.params.get("io") if callspec else None

    def start(*args: str, mountpoint: Path | None = None, store: Path | None = None,
              env: dict[str, str] | None = None) -> Mount:
        settings = {} if io is None else {"MODELFS_PASSTHROUGH": "on" if io == "passthrough" else "off"}
        settings.update(env or {})
        m = Mount(mountpoint or dirs["mnt"], store or dirs["store"], args, tmp_path / f"modelfs-{len(mounts)}.log",
                  settings)
        mounts.append(m)
        return m.start()

    yield start
    for m in mounts:
        m.stop()
    for m in mounts:
        bad = m.unexpected_errors()
        assert not bad, "unexpected errors in the modelfs log:\n" + "\n".join(bad)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """`router(flavour="llmlb", **kw)` → a running test router serving `tmp_path/routerN` (llmlb layout)."""
    routers: list[RouterProcess] = []

    def start(flavour: str = "llmlb", **kwargs: object) -> RouterProcess:
        models = tmp_path / f"router{len(routers)}"
        models.mkdir(exist_ok=True)
        routers.append(RouterProcess(models, flavour=flavour, **kwargs))  # type: ignore[arg-type]
        return routers[-1]

    yield start
    for r in routers:
        r.stop()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """`nginx(router_port)` → the shipped caching proxy in front of that router; `nginx(models_dir=DIR,
    limit_rate=None, tls=None)` → a plain nginx serving DIR (tests.support.nginx). All are stopped at teardown."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    started: list[Nginx] = []

    def start(router_port: int | None = None, models_dir: Path | None = None, limit_rate: str | None = None,
              tls: tuple[Path, Path] | None = None) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        if models_dir is None:
            assert router_port is not None, "nginx(router_port) or nginx(models_dir=...)"
            started.append(start_nginx(lambda: Nginx.shipped(prefix, router_port)))
        else:
            started.append(start_nginx(lambda: Nginx.models(prefix, models_dir, limit_rate, tls=tls)))
        return started[-1]

    yield start
    for n in started:
        n.stop()
