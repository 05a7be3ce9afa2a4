"""Bench cases on a shared directory that is an sshfs mount: `sshfs` (reads from the share, default I/O and
direct_io) and `hung` (a local read beside a lookup stalled on a stopped sshfs or a held router HEAD).
"""

from __future__ import annotations

import os
import subprocess
import time
from functools import partial
from pathlib import Path

from bench.core import BASE, DAEMON, REMOTE, SMALL, Bench, Lever, Result, cat, interleave, ratio_row, wants_passthrough
from bench.harness import cpu_seconds, median, prefault, spread, sshfs_available, start_sshfs
from bench.report import Row

# Cases. Each modelfs measurement starts its own daemon unless the case says otherwise; every run makes the
# files it assumes cached fully cached right before it is timed, after pre-faulting the memory it will fill.


def sshfs_read(b: Bench, lever: Lever, profile: str | None = None, share: Path | None = None) -> Result:
    """A fresh mount whose only source is the sshfs share (default: the direct_io one) reads the model once."""
    share = share or b.sshfs_dir
    assert share is not None
    m = b.mount(lever, b.work / "empty-store", ("--shared", str(share)), profile=profile)
    try:
        prefault(b.size)
        b.warm(b.remote)  # what the sshfs server reads
        cpu = cpu_seconds(m.pid)
        seconds = cat(m.model(REMOTE))
        cpu = cpu_seconds(m.pid) - cpu
        # sshfs -o direct_io cannot map files shared: modelfs serves it by the daemon path even with passthrough.
        io = "passthrough" if wants_passthrough(lever) and share != b.sshfs_dir else "daemon"
        b.expect_io(m.model(REMOTE), io)
        return {"MB/s": b.mb_s(seconds), "cpu s/GiB": cpu * (1 << 30) / b.size}
    finally:
        m.stop()


def ensure_sshfs(b: Bench) -> None:
    if b.sshfs_dir is None:
        b.sshfs_dir = b.work / "sshfs"
        b.sshfs_mount = start_sshfs(b.janitor, b.work / "origin", b.sshfs_dir)


def ensure_sshfs_cached(b: Bench) -> None:
    if b.sshfs_cached_dir is None:
        start_sshfs(b.janitor, b.work / "origin", b.work / "sshfs-cached", direct_io=False)
        b.sshfs_cached_dir = b.work / "sshfs-cached"


def case_sshfs(b: Bench) -> None:
    reason = sshfs_available()
    if reason:
        b.note(f"sshfs case skipped: {reason}")
        b.rows.append(Row("shared dir (sshfs, default I/O) read via mount", "skipped", "—", None, "≥ 1.0×", None))
        b.rows.append(Row("shared dir (sshfs -o direct_io) read via mount", "skipped", "—", None, "≥ 0.9×", None))
        return
    try:  # sshfs with its default I/O options: passthrough serves it
        ensure_sshfs_cached(b)
    except RuntimeError as exc:
        b.note(f"sshfs (default I/O) skipped: {str(exc).splitlines()[0]}")
        b.rows.append(Row("shared dir (sshfs, default I/O) read via mount", "skipped", "—", None, "≥ 1.0×", None))
    else:
        assert b.sshfs_cached_dir is not None
        share = b.sshfs_cached_dir
        mine, daemon, plain = interleave(b, [lambda: sshfs_read(b, BASE, share=share),
                                             lambda: sshfs_read(b, DAEMON, share=share),
                                             partial(sshfs_direct, b, share)], b.reps)
        b.note(f"sshfs (default I/O) read: passthrough MB/s {spread(mine['MB/s'], '{:.0f}')} (daemon CPU "
               f"{spread(mine['cpu s/GiB'], '{:.3f}')} s/GiB), daemon path {spread(daemon['MB/s'], '{:.0f}')} "
               f"(daemon CPU {spread(daemon['cpu s/GiB'], '{:.2f}')} s/GiB), sshfs directly "
               f"{spread(plain['MB/s'], '{:.0f}')} (no sshfs caches but the kernel's page cache, dropped at each "
               "open; server file cached)")
        b.rows.append(ratio_row("shared dir (sshfs, default I/O) read via mount", "MB/s", mine["MB/s"],
                                plain["MB/s"], 1.0, daemon=daemon["MB/s"]))
    ensure_sshfs(b)  # direct_io: no shared mmap, so passthrough falls back to the daemon path for this share
    assert b.sshfs_dir is not None
    mine, daemon, plain = interleave(b, [lambda: sshfs_read(b, BASE), lambda: sshfs_read(b, DAEMON),
                                         partial(sshfs_direct, b, b.sshfs_dir)], b.reps)
    b.note(f"sshfs -o direct_io read: modelfs (auto, falls back to the daemon path) MB/s "
           f"{spread(mine['MB/s'], '{:.0f}')} (daemon CPU {spread(mine['cpu s/GiB'], '{:.2f}')} s/GiB), "
           f"--passthrough off {spread(daemon['MB/s'], '{:.0f}')}, sshfs directly {spread(plain['MB/s'], '{:.0f}')} "
           "(sshfs with direct_io and no caches, as in tests/support/sshfs.py; server file cached)")
    b.rows.append(ratio_row("shared dir (sshfs -o direct_io) read via mount (daemon fallback)", "MB/s", mine["MB/s"],
                            plain["MB/s"], 0.9, daemon=daemon["MB/s"]))
    if b.profile:
        sshfs_read(b, BASE, profile="sshfs")


def sshfs_direct(b: Bench, share: Path) -> Result:
    prefault(b.size)
    b.warm(b.remote)
    return {"MB/s": b.mb_s(cat(share / REMOTE / "model.gguf"))}


HUNG = "bench/hung"  # a name in the same directory that is nowhere local: its lookup asks the shared dir or router


def daemon_waits_on_fuse(pid: int) -> bool:
    """Whether a thread of `pid` sleeps in a FUSE request (the daemon's worker inside a stopped sshfs)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if "fuse" in (task / "wchan").read_text() or "request_wait_answer" in (task / "stack").read_text():
                return True
        except OSError:
            continue
    return False


def beside_hung_lookup(b: Bench, lever: Lever | None, fault: str) -> Result:
    """ms of `cat` of a small local model (a fresh lookup + open + read in a new process) while a lookup of another
    name in the same directory waits on a stalled router HEAD (`fault="router"`) or a stopped sshfs ("shared").
    Without a lever: the same `cat` of the backing file, for reference."""
    if lever is None:
        return {"ms": 1000 * cat(b.work / "store" / SMALL / "model.gguf")}
    args = ("--router", b.url) if fault == "router" else ("--shared", str(b.sshfs_dir))
    m = b.mount(lever, args=args)
    hung: subprocess.Popen[bytes] | None = None
    try:
        os.stat(m.path / "bench")  # the directory's own lookup (store) is not what is measured
        deadline = time.monotonic() + 10
        if fault == "router":
            assert b.router is not None
            b.router.reset()
            b.router.control(hang=True, models=[HUNG])
            hung = subprocess.Popen(["stat", str(m.model(HUNG))], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            while not any(r["method"] == "HEAD" and r["name"] == HUNG for r in b.router.stats()["requests"]):
                if time.monotonic() > deadline or hung.poll() is not None:
                    raise RuntimeError("the router never held the HEAD of the stalled lookup")
                time.sleep(0.01)
        else:
            assert b.sshfs_mount is not None
            b.sshfs_mount.stop()
            hung = subprocess.Popen(["stat", str(m.model(HUNG))], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            while not daemon_waits_on_fuse(m.pid):
                if time.monotonic() > deadline or hung.poll() is not None:
                    raise RuntimeError("the daemon never waited on the stopped sshfs")
                time.sleep(0.01)
        seconds = cat(m.model(SMALL))
        if hung.poll() is not None:
            raise RuntimeError(f"the stalled lookup ended before the measured read did ({fault}): not measured")
        return {"ms": 1000 * seconds}
    finally:
        if fault == "router" and b.router is not None:
            b.router.control(hang=None, models=None)
        if fault == "shared" and b.sshfs_mount is not None and b.sshfs_mount.stopped:
            b.sshfs_mount.cont()
        if hung is not None:
            try:
                hung.wait(timeout=30)
            except subprocess.TimeoutExpired:
                hung.kill()
                hung.wait()
        m.stop()


def case_hung(b: Bench) -> None:
    faults = []
    if b.router is None:
        b.note("hung lookup beside a stalled router: skipped (needs the test router, not --server nginx)")
    else:
        faults.append(("router", "a stalled router HEAD"))
    reason = sshfs_available()
    if reason is None:
        try:
            ensure_sshfs(b)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
    if reason is None:
        faults.append(("shared", "a hung shared dir (sshfs SIGSTOP)"))
    else:
        b.note(f"hung lookup beside a hung shared dir: skipped ({reason})")
    for fault, what in faults:
        mine, daemon, plain = interleave(b, [partial(beside_hung_lookup, b, BASE, fault),
                                             partial(beside_hung_lookup, b, DAEMON, fault),
                                             partial(beside_hung_lookup, b, None, fault)], b.reps)
        b.note(f"lookup + read of a small local model beside a lookup waiting on {what}: passthrough "
               f"{spread(mine['ms'], '{:.1f}')} ms, daemon path {spread(daemon['ms'], '{:.1f}')} ms; `cat` of the "
               f"backing file {spread(plain['ms'], '{:.1f}')} ms")
        m, d = median(mine["ms"]), median(daemon["ms"])
        b.rows.append(Row(f"lookup + read of a local model beside {what}", f"{m:.1f} ms",
                          f"{median(plain['ms']):.1f} ms", None, "≤ 100 ms", m <= 100 and d <= 100,
                          daemon=f"{d:.1f} ms"))
