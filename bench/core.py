"""The bench's core: a measured daemon (`Lever`), one run's state and its mounts (`Bench`), interleaved A/B
repetitions and the rows they make, and the small helpers every case uses (timed `cat`, a mount's I/O path and
counters, the probe child). The cases themselves are in local_cases, shared_cases and download_cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    PYTHON,
    ROOT,
    Janitor,
    Profile,
    RouterProcess,
    SshfsMount,
    cached_bytes,
    median,
    start_mount,
    timed,
    warm,
)
from bench.report import Row
from tests.support.mount import Mount

LOCAL = "bench/local"  # in the store: DIR/bench/local/model.gguf
REMOTE = "bench/remote"  # only on the router (and on the sshfs share)
PROBE = [PYTHON, "-m", "bench.probe"]  # run from ROOT
SMALL = "bench/small"  # a small local model beside LOCAL, for the hung-lookup case

Result = dict[str, float]


@dataclass(frozen=True)
class Lever:
    """A daemon measured with MODELFS_* settings of its own (the daemon path, a number of streams...)."""

    name: str
    settings: tuple[tuple[str, str], ...] = ()


BASE = Lever("as is")
#: The daemon read path, measured beside BASE (passthrough wherever the kernel allows it) in every read case.
DAEMON = Lever("daemon path", settings=(("MODELFS_PASSTHROUGH", "off"),))


@dataclass
class Bench:
    size: int
    reps: int
    readers: int
    missing: int
    work: Path
    janitor: Janitor
    server: str
    profile: bool
    rows: list[Row] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    rss: list[tuple[str, int]] = field(default_factory=list)
    url: str = ""
    counter: Callable[[], object] | None = None  # resets the router's byte counts
    sent: Callable[[str], int] | None = None  # bytes the router sent for a model since the reset
    sshfs_dir: Path | None = None  # sshfs -o direct_io, as in the tests: passthrough falls back to the daemon
    sshfs_mount: SshfsMount | None = None
    sshfs_cached_dir: Path | None = None  # sshfs with its default I/O options (page cache, shared mmap)
    router: RouterProcess | None = None  # the test router (faults), None with --server nginx
    code: Path | None = None
    read_ahead: set[int] = field(default_factory=set)
    profiles: list[Profile] = field(default_factory=list)
    case_rows: dict[str, list[Row]] = field(default_factory=dict)  # the rows each case printed, for --check

    @property
    def local(self) -> Path:
        return self.work / "store" / LOCAL / "model.gguf"

    @property
    def remote(self) -> Path:
        return self.work / "origin" / REMOTE / "model.gguf"

    def mb_s(self, seconds: float) -> float:
        return self.size / seconds / 1e6

    def mount(self, lever: Lever, store: Path | None = None, args: tuple[str, ...] = (),
              profile: str | None = None, mnt: str = "mnt") -> Mount:
        """A fresh daemon (stopped by the janitor at the latest), recorded by py-spy into
        bench/out/profile-`profile`.txt if asked."""
        m = start_mount(self.janitor, self.work / mnt, store or self.work / "store", args, self.work / "modelfs.log",
                        dict(lever.settings), code=self.code)
        # modelfs sets read-ahead just after the kernel's handshake, a moment after the mount appears: wait for it
        # (up to 2 s), so no timed run starts in that window.
        os.stat(m.path)
        deadline = time.monotonic() + 2
        while m.read_ahead_kb() == 128 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.read_ahead.add(m.read_ahead_kb())
        if profile is not None:  # py-spy ends with the daemon, or at the latest in run_size
            self.profiles.append(Profile(self.janitor, m.pid, self.work.parent / f"profile-{profile}.txt"))
        state = passthrough_state(m.path)
        if state.get("active") is not wants_passthrough(lever):
            m.stop()
            raise RuntimeError(f"modelfs ({lever.name}) mounted with passthrough {state}; this bench measures "
                               f"passthrough as the base and the daemon path as a lever (scripts/setup, root)")
        return m

    def expect_io(self, path: Path, io: str) -> None:
        """Fail loudly unless an open of `path` (a file in a mount) is served the way the row claims."""
        got = file_io(path)
        if got != io:
            raise RuntimeError(f"{path} is served by {got}, expected {io}")

    def warm(self, path: Path) -> None:
        """Make `path` fully cached right before a timed run (modelfs drops backing pages behind its readers, and
        this VM's DAMON pages out idle page cache), and note if that failed."""
        warm(path)
        share = cached_bytes(path) / self.size
        if share < 0.99:
            self.note(f"warning: only {share:.0%} of {path.name} in the page cache before a warm run")

    def note(self, line: str) -> None:
        self.raw.append(line)
        print(f"  {line}", flush=True)


def interleave(b: Bench, runs: Sequence[Callable[[], Result]], reps: int) -> list[dict[str, list[float]]]:
    """Run each function `reps` times, alternating the order every repetition (ABBA...); samples per key."""
    samples: list[dict[str, list[float]]] = [{} for _ in runs]
    for rep in range(reps):
        order = list(range(len(runs)))
        if rep % 2:
            order.reverse()
        for index in order:
            for key, value in runs[index]().items():
                samples[index].setdefault(key, []).append(value)
    return samples


def ratio_row(case: str, unit: str, mine: list[float], direct: list[float], target: float,
              higher: bool = True, daemon: list[float] | None = None) -> Row:
    """`mine` is modelfs as configured (passthrough where it applies), `daemon` the daemon read path, if measured."""
    m, d = median(mine), median(direct)
    ratio = m / d if d else float("nan")
    met = ratio >= target if higher else ratio <= target
    row = Row(case, f"{m:.1f} {unit}", f"{d:.1f} {unit}", ratio, f"{'≥' if higher else '≤'} {target}×", met,
              higher=higher)
    if daemon is not None:
        row.daemon = f"{median(daemon):.1f} {unit}"
        row.daemon_ratio = median(daemon) / d if d else float("nan")
    return row


def daemon_row(case: str, unit: str, daemon: list[float], direct: list[float], target: float,
               higher: bool = True) -> Row:
    """A daemon-path target (issue 18: kernels without passthrough) as a row of its own, the daemon path in the
    modelfs column."""
    return ratio_row(f"daemon path: {case}", unit, daemon, direct, target, higher)


def cat(path: Path) -> float:
    return timed(["cat", str(path)])


def wants_passthrough(lever: Lever) -> bool:
    return ("MODELFS_PASSTHROUGH", "off") not in lever.settings


def passthrough_state(mnt: Path) -> dict[str, object]:
    """The root's `user.modelfs.passthrough`: {"mode", "active", "reason"}."""
    state: dict[str, object] = json.loads(os.getxattr(mnt, "user.modelfs.passthrough"))
    return state


def file_io(path: Path) -> str:
    """The I/O path of a model while it is open: "passthrough" or "daemon" (`user.modelfs.io` without the reason a
    fallback adds, "daemon (filesystem cannot map files shared)")."""
    with open(path, "rb"):
        return io_path(os.getxattr(path, "user.modelfs.io").decode())


def io_path(value: str) -> str:
    return value.split(" (", 1)[0]


def c_read_bytes(mnt: Path) -> int:
    """Bytes the mount's daemon answered in C (patched pyfuse3) so far, from the root's status xattr; 0 without."""
    status = json.loads(os.getxattr(mnt, "user.modelfs.status"))
    return int(status.get("c_answers", {}).get("read_bytes", 0))


def wait_promoted(store: Path, timeout: float = 600) -> None:
    """Wait until a download is verified, fsynced and renamed into `store`."""
    final = store / REMOTE / "model.gguf"
    deadline = time.monotonic() + timeout
    while not final.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"download into {store} did not finish")
        time.sleep(0.01)


def probe(*args: str) -> dict[str, object]:
    out = subprocess.run([*PROBE, *args], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, object] = json.loads(out)
    return result
