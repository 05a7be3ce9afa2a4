"""The life of a serving daemon: checks, mounting or taking over a live mount, the trio loop, readiness, signals,
and the end: a clean unmount, or a hand-over that leaves the mount to the next daemon.

Nothing else calls pyfuse3.init/resume/close. Start-up problems become `MountError` with a one-line reason.
Readiness is reported once the mount is being served: to the service manager or supervisor (`READY=1` on
NOTIFY_SOCKET, after its descriptors were given to it: see `handover`) and, when `modelfs mount` daemonized
itself, to the waiting parent through a pipe. SIGTERM, SIGINT and SIGHUP unmount; SIGUSR1 hands over.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from . import fdstore, fusedev, metrics
from .catalog import Catalog
from .config import Config
from .fetcher import Fetcher
from .fs import ModelFS
from .fusermount import MountError, is_stale, unmount
from .handover import (
    DRAIN_SECONDS,
    FUSE_NAME,
    HANDOVER_EXIT,
    STATE_PREFIX,
    Holder,
    TakeOver,
    lifecycle,
    remount,
    standby,
    take_over,
)
from .opener import Opener
from .passthrough import Passthrough, PassthroughUnavailable
from .quota import Quota
from .recovery import Recorder, Restored, saved_version
from .resolver import Resolver
from .router import Router
from .shared import SharedDir
from .state import Journal, Saved, StateError
from .store import Store, StoreError

__all__ = ["HANDOVER_EXIT", "MountError", "is_stale", "run", "unmount"]

log = logging.getLogger(__name__)


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


@dataclass
class Daemon:
    """What the serving loop needs besides the filesystem."""

    mountpoint: Path
    config: Config
    holder: Holder
    passthrough: Passthrough
    operations: ModelFS
    shared: list[SharedDir]
    router: Router | None
    fetcher: Fetcher | None
    services: list[Callable[..., Awaitable[None]]]  # downloads, the routers' list, the store count
    ready: Callable[[], None]
    restored: Restored | None = None
    journal: Journal | None = None
    restarts: int = 0
    device: tuple[int, int] = (0, 0)  # of the kernel mount, recorded in the journal
    handover: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def run(config: Config, mountpoint: Path, ready: Callable[[], None] = lambda: None) -> int:
    """Serve the mount until it is unmounted (returns 0) or handed over (returns HANDOVER_EXIT). Blocks."""
    holder = Holder()
    store = Store(config.store)
    shared = [SharedDir(root, config.shared_timeout) for root in config.shared]
    router = Router(config) if config.router else None
    fetcher = Fetcher(store, router, config.retries) if router else None
    # A listing waits for the sizes of models listed without one at most as long as one metadata request may take.
    catalog = Catalog(router, config.router_list_ttl, config.negative_cache_ttl,
                      min(config.read_timeout, 5.0)) if router else None
    quota = Quota(store, config.store_max_size, fetcher)
    resolver = Resolver(config, store, shared, catalog, fetcher)
    passthrough = Passthrough(config.passthrough)
    try:
        passthrough.check()
    except PassthroughUnavailable as exc:
        raise MountError(str(exc)) from None
    operations = ModelFS(resolver, Opener(resolver, quota, config.drop_backing_cache), passthrough)
    services: list[Callable[..., Awaitable[None]]] = [s.run for s in (fetcher, catalog, quota) if s is not None]
    operations.status.lifecycle = lifecycle(holder, 0, None, None)  # completed once the mount is served
    daemon = Daemon(mountpoint, config, holder, passthrough, operations, shared, router, fetcher, services, ready)
    standby()  # everything above is ready before a planned restart stops the old daemon
    taken = take_over(mountpoint, holder)
    if taken is None:
        check(config, mountpoint)
    else:
        resolver.started_ns = taken.saved.started_ns  # the mount's start, which its directories' mtime shows
    started_ns = resolver.started_ns
    if taken is not None and not _resume(daemon, taken):
        check(config, mountpoint)
        taken = None
    server = start_metrics(config, shared)
    if taken is None:
        try:
            pyfuse3.init(operations, str(mountpoint), options(config))
        except RuntimeError as exc:
            if server is not None:
                server.close()
            raise MountError(f"cannot mount {mountpoint}: {exc}") from None
        if holder.present:
            daemon.journal = Journal.create(1)
            daemon.journal.append({"t": "mount", "mountpoint": str(mountpoint), "started_ns": started_ns})
            _record(daemon, daemon.journal)
        log.info("mounted %s: store %s, shared %s, routers %s", mountpoint, config.store,
                 ", ".join(map(str, config.shared)) or "none", ", ".join(config.router) or "none")
    clean = False
    try:
        trio.run(_serve, daemon)
        clean = True
    except PassthroughUnavailable as exc:
        raise MountError(str(exc)) from None
    finally:
        _end(daemon, resumed=taken is not None, clean=clean)
        if server is not None:
            server.close()
    return HANDOVER_EXIT if daemon.handover else 0


def _resume(daemon: Daemon, taken: TakeOver) -> bool:
    """Serve the inherited connection: check the state, replay FUSE_INIT, restore the tables. False (after a
    remount) when it cannot be."""
    saved = taken.saved
    operations = daemon.operations
    resolver = operations.resolver
    try:
        restored = Restored(saved, resolver.store, daemon.shared, daemon.fetcher, daemon.config.drop_backing_cache)
        # The session owns (and at its end closes) a duplicate: ours stays ours to give up if this fails.
        pyfuse3.resume(operations, os.dup(taken.fd), saved.init_request, saved.init_reply, options(daemon.config))
    except (StateError, RuntimeError, ValueError) as exc:
        remount(daemon.mountpoint, f"cannot resume: {exc}", taken.fd, (saved.generation, taken.state_fd),
                daemon.holder)
        return False
    os.close(taken.fd)
    versions, handles = restored.versions()
    operations.inodes.restore(saved.dirs, versions, handles, saved.next_inode, saved.next_fh)
    operations.restore_dir_handles({fh: saved.dirs.get(inode, "") for fh, inode in saved.dir_handles.items()},
                                   saved.next_dir_fh)
    daemon.restored = restored
    daemon.restarts = saved.restarts + 1
    daemon.device = saved.device
    operations.status.lifecycle = lifecycle(daemon.holder, daemon.restarts, None, None)
    daemon.journal = Journal(taken.state_fd, saved.generation, saved.length)
    recorder = _record(daemon, daemon.journal)
    recorder.restarted(daemon.restarts)
    log.info("resumed %s (restart %d): %d directories, %d file inodes, %d open files, %d directory handles",
             daemon.mountpoint, daemon.restarts, len(saved.dirs), len(saved.versions), len(saved.handles),
             len(saved.dir_handles))
    return True


def _record(daemon: Daemon, journal: Journal) -> Recorder:
    """Journal everything the kernel learns from now on (see `recovery.Recorder`)."""
    operations = daemon.operations

    def snapshot() -> Saved:
        dirs, versions, handles, next_inode, next_fh = operations.inodes.tables()
        dir_handles, next_dir_fh = operations.dir_handles()
        init = pyfuse3.init_record()
        assert init is not None  # journals are compacted only after FUSE_INIT
        return Saved(generation=0, length=0, mountpoint=str(daemon.mountpoint),
                     started_ns=operations.resolver.started_ns, init_request=init[0], init_reply=init[1],
                     device=daemon.device, restarts=daemon.restarts, dirs={i: p for i, p in dirs.items() if p},
                     versions={v.inode: saved_version(v) for v in versions}, handles=handles,
                     dir_handles=dir_handles, next_inode=next_inode, next_fh=next_fh, next_dir_fh=next_dir_fh)

    recorder = Recorder(journal, daemon.holder, snapshot)
    operations.inodes.recorder = recorder
    return recorder


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


async def _serve(daemon: Daemon) -> None:
    """Serve until unmounted or handed over; the background services live in this nursery, so they stop before
    the router client closes."""
    async with trio.open_nursery() as nursery:
        for service in daemon.services:
            await nursery.start(service)
        for directory in daemon.shared:
            nursery.start_soon(directory.probe_forever)
        nursery.start_soon(_on_signals, daemon)
        if daemon.restored is not None:
            daemon.restored.resume_downloads()
            _resend(daemon)
        nursery.start_soon(_announce, daemon)
        with daemon.scope:
            await pyfuse3.main()
        nursery.cancel_scope.cancel()
    if daemon.router is not None:
        await daemon.router.aclose()


def _resend(daemon: Daemon) -> None:
    """Ask the kernel for the requests the previous daemon read but never answered (Linux >= 6.9)."""
    saved = daemon.restored.saved if daemon.restored else None
    if saved is None:
        return
    if not fusedev.kernel_resends(saved.init_request):
        log.warning("this kernel cannot resend requests (FUSE_NOTIFY_RESEND needs Linux 6.9): calls the previous "
                    "daemon had taken but not answered stay unanswered until their process is killed")
        return
    try:
        fusedev.resend(pyfuse3.session_fd())
    except OSError as exc:
        log.warning("FUSE_NOTIFY_RESEND failed (%s): calls the previous daemon held stay unanswered", exc.strerror)


async def _announce(daemon: Daemon) -> None:
    """Once the kernel has finished its handshake with us (a stat of the root is answered only after FUSE_INIT),
    learn whether passthrough was granted, give the connection and its state to the holder, tune read-ahead
    (FUSE_INIT would reset it) and tell whoever waits that the mount is live. `--passthrough on` without it ends
    the mount here, before anyone is told it is live."""
    mountpoint = daemon.mountpoint
    pause = None
    if daemon.restored is None:
        await trio.to_thread.run_sync(os.stat, mountpoint)
    else:
        since = os.environ.pop("MODELFSD_RESTART_FROM", "")
        pause = (time.monotonic_ns() - int(since)) / 1e9 if since.isdigit() else None
    init = pyfuse3.init_record()
    if init is None:  # unmounted before the kernel's handshake (the stat above then saw the bare directory)
        log.info("%s was unmounted before it was served", mountpoint)
        return
    daemon.passthrough.require()
    if daemon.journal is not None and daemon.restored is None:
        daemon.device = fusedev.mount_device(mountpoint) or (0, 0)
        daemon.journal.append({"t": "init", "req": init[0].hex(), "rep": init[1].hex(), "dev": list(daemon.device)})
        daemon.holder.store(FUSE_NAME, pyfuse3.session_fd())
        daemon.holder.store(f"{STATE_PREFIX}{daemon.journal.generation}", daemon.journal.fd)
    daemon.operations.status.lifecycle = lifecycle(daemon.holder, daemon.restarts, pause, init)
    set_read_ahead(mountpoint, daemon.config.read_ahead_kb)
    daemon.ready()
    fdstore.notify(f"READY=1\nSTATUS=serving (pid {os.getpid()}, restart {daemon.restarts})")
    if pause is not None:
        log.info("serving %s again %.3fs after the previous daemon ended", mountpoint, pause)


async def _on_signals(daemon: Daemon) -> None:
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    with trio.open_signal_receiver(*signals) as received:
        async for signum in received:
            if signum != signal.SIGUSR1:
                log.info("%s received; unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return
            if not daemon.holder.present:
                log.warning("SIGUSR1 ignored: nothing holds this mount's connection (no supervisor or service "
                            "manager), so a hand-over would unmount it")
                continue
            log.info("SIGUSR1 received: handing %s over to the next daemon", daemon.mountpoint)
            daemon.handover = True
            pyfuse3.terminate()
            init = pyfuse3.init_record()
            if init is not None and fusedev.kernel_resends(init[0]):
                # Requests in progress (a read waiting on a download, a shared directory) are left unanswered:
                # the kernel sends them to the next daemon, so none of them holds the hand-over up.
                daemon.scope.cancel()
                return
            await trio.sleep(DRAIN_SECONDS)  # no resend on this kernel: let them finish, up to a bound
            log.warning("requests still in progress after %.0fs are cancelled; their callers get errors",
                        DRAIN_SECONDS)
            daemon.scope.cancel()
            return


def _end(daemon: Daemon, resumed: bool, clean: bool) -> None:
    """Unmount, or (hand-over) leave the mount to the holder's next daemon."""
    mountpoint = daemon.mountpoint
    if daemon.handover:
        fdstore.notify("STOPPING=1\nSTATUS=handing over")
        pyfuse3.close(unmount=False)
        log.info("handed %s over (pid %d exits; the mount stays)", mountpoint, os.getpid())
        return
    fdstore.notify("STOPPING=1")
    if resumed:  # libfuse knows no mountpoint for a session it did not mount
        pyfuse3.close(unmount=False)
        if fusedev.mount_device(mountpoint) is not None:
            try:
                unmount(mountpoint, lazy=True)
            except MountError as exc:
                log.warning("cannot unmount %s: %s", mountpoint, exc)
    else:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s%s", mountpoint, "" if clean else " after an error")


def negotiation_difference(init_request: bytes, init_reply: bytes, passthrough: bool) -> str | None:
    """How this modelfs would answer a mount's recorded FUSE_INIT differently (None: identically), so that
    `modelfs restart` refuses a hand-over the new daemon could not make, before touching the mount."""

    class Probe(ModelFS):
        """ModelFS's class attributes, which are what FUSE_INIT negotiates (all of them, by inheritance), without
        its state or its init()."""

        def __init__(self) -> None:  # no resolver, no inodes: only the negotiation is asked of it
            pyfuse3.Operations.__init__(self)
            self.enable_passthrough = passthrough

        def init(self) -> None:
            pass

    reply = pyfuse3.replay_init(Probe(), init_request)
    if reply == init_reply:
        return None
    return pyfuse3.init_difference(init_reply, reply)
