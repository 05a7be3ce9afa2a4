"""The life of a mount: checks, pyfuse3.init, the trio loop, readiness, signals, and a clean unmount.

Nothing else calls pyfuse3.init/close. Start-up problems become `MountError` with a one-line reason. Readiness
is reported once the kernel mount exists and the loop is serving it: to systemd (`READY=1` on NOTIFY_SOCKET) and,
when `modelfs mount` daemonized itself, to the waiting parent through a pipe.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import trio

from . import metrics
from .catalog import Catalog
from .config import Config
from .fetcher import Fetcher
from .fs import ModelFS
from .opener import Opener
from .passthrough import Passthrough, PassthroughUnavailable
from .quota import Quota
from .resolver import Resolver
from .router import Router
from .shared import SharedDir
from .store import Store, StoreError

log = logging.getLogger(__name__)


class MountError(Exception):
    """The mount cannot start; the message is the one line an admin needs."""


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


def is_stale(mountpoint: Path) -> bool:
    """A mountpoint left behind by a dead FUSE daemon answers ENOTCONN (statfs: the kernel never caches it)."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount a FUSE mount (ours or a stale one); MountError with the tool's message on failure."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u"] if tool else ["umount"]
    if lazy:
        command.append("-z" if tool else "-l")
    result = subprocess.run([*command, str(mountpoint)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise MountError(result.stderr.strip() or f"{' '.join(command)} failed")


def check(config: Config, mountpoint: Path) -> None:
    """Everything that can be known wrong before mounting, each with a clear reason."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3")
    if is_stale(mountpoint):
        log.warning("%s is a stale mount of a dead FUSE daemon; unmounting it lazily", mountpoint)
        unmount(mountpoint, lazy=True)
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    try:
        Store(config.store).check()
    except StoreError as exc:
        raise MountError(str(exc)) from None
    for root in config.shared:
        if not root.is_absolute():
            raise MountError(f"shared directory {root} must be an absolute path")


def set_read_ahead(mountpoint: Path, kb: int) -> None:
    """Raise the mount's read-ahead so the kernel sends 1 MiB reads instead of 128 KiB ones (fewer round trips).

    Must run after FUSE_INIT, whose reply sets the read-ahead again. The device number comes from
    /proc/self/mountinfo.
    """
    if not kb:
        return
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint) and " - fuse.modelfs " in line:
                device = fields[2]
    if device is None:
        log.warning("cannot find %s in /proc/self/mountinfo; read-ahead left at the kernel default", mountpoint)
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(kb))
    except OSError as exc:
        log.info("cannot set read-ahead of %s to %d KiB (%s); using the kernel default", mountpoint, kb,
                 exc.strerror)


def options(config: Config) -> set[str]:
    opts = {"fsname=modelfs", "subtype=modelfs", "ro", "default_permissions", "noatime"}
    if config.allow_other:
        opts.add("allow_other")
    return opts


def run(config: Config, mountpoint: Path, ready: Callable[[], None] = lambda: None) -> None:
    """Mount, serve until unmounted or signalled, then unmount. Blocks."""
    check(config, mountpoint)
    store = Store(config.store)
    shared = [SharedDir(root, config.shared_timeout) for root in config.shared]
    router = Router(config) if config.router else None
    started_ns = time.time_ns()
    fetcher = Fetcher(store, router, config.retries) if router else None
    # A listing waits for the sizes of models listed without one at most as long as one metadata request may take.
    catalog = Catalog(router, config.router_list_ttl, config.negative_cache_ttl,
                      min(config.read_timeout, 5.0)) if router else None
    quota = Quota(store, config.store_max_size, fetcher)
    resolver = Resolver(config, store, shared, catalog, fetcher, started_ns)
    passthrough = Passthrough(config.passthrough)
    try:
        passthrough.check()
    except PassthroughUnavailable as exc:
        raise MountError(str(exc)) from None
    operations = ModelFS(resolver, Opener(resolver, quota, config.drop_backing_cache), passthrough)
    server = start_metrics(config, shared)
    try:
        pyfuse3.init(operations, str(mountpoint), options(config))
    except RuntimeError as exc:
        if server is not None:
            server.close()
        raise MountError(f"cannot mount {mountpoint}: {exc}") from None
    log.info("mounted %s: store %s, shared %s, routers %s", mountpoint, config.store,
             ", ".join(map(str, config.shared)) or "none", ", ".join(config.router) or "none")
    clean = False
    try:
        services: list[Callable[..., Awaitable[None]]] = [s.run for s in (fetcher, catalog, quota) if s is not None]
        trio.run(_serve, mountpoint, config.read_ahead_kb, shared, router, services, passthrough, ready)
        clean = True
    except PassthroughUnavailable as exc:
        raise MountError(str(exc)) from None
    finally:
        sd_notify("STOPPING=1")
        pyfuse3.close(unmount=True)
        if server is not None:
            server.close()
        log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")


def start_metrics(config: Config, shared: list[SharedDir]) -> metrics.MetricsServer | None:
    """The Prometheus endpoint (`--metrics`), before the mount exists: a port in use is a start-up error."""
    metrics.init_labels([str(d.root) for d in shared], config.store_max_size)
    if config.metrics is None:
        return None
    host, port = config.metrics
    try:
        server = metrics.MetricsServer(host, port)
    except OSError as exc:
        raise MountError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]",
             server.port)
    return server


async def _serve(mountpoint: Path, read_ahead_kb: int, shared: list[SharedDir], router: Router | None,
                 services: list[Callable[..., Awaitable[None]]], passthrough: Passthrough,
                 ready: Callable[[], None]) -> None:
    """Serve until unmounted; the background services (downloads, the routers' list, the store count) live in
    this nursery, so they stop before the router client closes."""
    async with trio.open_nursery() as nursery:
        for service in services:
            await nursery.start(service)
        for directory in shared:
            nursery.start_soon(directory.probe_forever)
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(_announce, mountpoint, read_ahead_kb, passthrough, ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    if router is not None:
        await router.aclose()


async def _announce(mountpoint: Path, read_ahead_kb: int, passthrough: Passthrough,
                    ready: Callable[[], None]) -> None:
    """Once the kernel has finished its handshake with us (a stat of the root is answered only after FUSE_INIT),
    learn whether passthrough was granted, tune read-ahead (FUSE_INIT would reset it) and tell whoever waits
    that the mount is live. `--passthrough on` without it ends the mount here, before anyone is told it is live."""
    await trio.to_thread.run_sync(os.stat, mountpoint)
    passthrough.require()
    set_read_ahead(mountpoint, read_ahead_kb)
    ready()
    sd_notify("READY=1\nSTATUS=serving")


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s received; unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
