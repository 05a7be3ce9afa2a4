"""Fixtures that mount a real modelfs in a subprocess and always unmount it.

`mount(...)` starts `modelfs mount --foreground` as a real process (so tests can kill -9 it), waits for the
kernel mount, and at teardown unmounts lazily and checks the daemon's log: a traceback or an ERROR line nobody
declared expected fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sshfs import is_mounted  # noqa: E402

MODELFS = [sys.executable, "-m", "modelfs"]


def fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if os.geteuid() != 0:
        return "FUSE integration tests run as root"
    return None


class Mount:
    """One running modelfs daemon and its mountpoint."""

    def __init__(self, path: Path, store: Path, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.path = path
        self.store = store
        self.args = args
        self.log = log
        self.env = env
        # When the mount goes away (or a reader is killed) the kernel drops requests still in flight, such as
        # read-ahead waiting on a download or a queued FUSE_RELEASE; libfuse then cannot reply to them.
        self.expected_errors: list[str] = ["fuse_reply_* failed with No such file or directory"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mount:
        path = self.path
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*MODELFS, "mount", str(path), "--store", str(self.store), "--foreground", *self.args],
                stdout=log, stderr=log, env=self.env,
            )
        deadline = time.monotonic() + 15
        while not is_mounted(str(path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelfs exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"modelfs did not mount within 15s:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def model(self, name: str) -> Path:
        return self.path / f"{name}.gguf"

    def kill9(self) -> None:
        """Crash the daemon; the mountpoint stays behind in ENOTCONN state."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=10)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        elif is_mounted(str(self.path)):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=10)
        self.proc = None

    def unexpected_errors(self) -> list[str]:
        bad = []
        for line in self.log_text().splitlines():
            if ("Traceback" in line or " ERROR " in line or " CRITICAL " in line) and not any(
                expected in line for expected in self.expected_errors
            ):
                bad.append(line)
        return bad


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
    """`mount(*args, mountpoint=None, store=None)` → a started Mount; all are stopped and checked at teardown.

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
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS_", "LLM_"))}
        if io is not None:
            environment["MODELFS_PASSTHROUGH"] = "on" if io == "passthrough" else "off"
        environment.update(env or {})
        m = Mount(mountpoint or dirs["mnt"], store or dirs["store"], list(args),
                  tmp_path / f"modelfs-{len(mounts)}.log", environment)
        mounts.append(m)
        return m.start()

    yield start
    for m in mounts:
        m.stop()
    for m in mounts:
        bad = m.unexpected_errors()
        assert not bad, "unexpected errors in the modelfs log:\n" + "\n".join(bad)


def write_model(root: Path, name: str, data: bytes, flat: bool = False) -> Path:
    """Put a model file in a models directory, in the llmlb layout (or flat)."""
    path = root / f"{name}.gguf" if flat else root / name / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def gguf_bytes(size: int, seed: int = 0) -> bytes:
    """Bytes that start with the GGUF magic (enough for tests that only compare bytes)."""
    return b"GGUF" + os.urandom(size - 4) if seed == 0 else b"GGUF" + bytes((seed + i) % 251 for i in range(size - 4))


@pytest.fixture
def router(tmp_path: Path) -> Iterator[object]:
    """`router(flavour="llmlb", **kw)` → a running test router serving `tmp_path/routerN` (llmlb layout)."""
    from router_server import RouterProcess

    routers: list[RouterProcess] = []

    def start(flavour: str = "llmlb", **kwargs: object) -> RouterProcess:
        models = tmp_path / f"router{len(routers)}"
        models.mkdir(exist_ok=True)
        r = RouterProcess(models, flavour=flavour, **kwargs)
        r.models_dir = models  # type: ignore[attr-defined]
        routers.append(r)
        return r

    yield start
    for r in routers:
        r.stop()


def wait_for(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll until `predicate()` is true; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
