"""Command line: `modelfs mount | umount | restart | status | prefetch`.

`mount` runs a supervisor (`supervisor`) that starts the serving daemon and restarts it if it dies, keeping the
mount: in the background (it forks before any thread exists, and returns only when the mount is live, exit 0, or
failed, exit 1 with the reason) or, with --foreground, in this process. Under a service manager (NOTIFY_SOCKET:
systemd) or with --no-supervisor, this process is the serving daemon itself. Secrets never go on the command line
by preference: --router-token exists, but MODELFS_ROUTER_TOKEN or the config file keep the key out of `ps`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, ConfigError, load

log = logging.getLogger("modelfs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfs",
        description="A read-only FUSE filesystem serving GGUF models from a local store, shared directories "
        "(NFS) in place, and llmlb routers.",
    )
    parser.add_argument("--version", action="version", version=f"modelfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    mount = commands.add_parser(
        "mount",
        help="mount modelfs",
        description="Mount modelfs at MOUNTPOINT. Settings come from flags > MODELFS_* environment > config file "
        "> llmlb node variables (LLM_NODE_MODELS_DIR, LLM_NODE_SHARED_MODELS_DIR, LLM_ROUTER_URL, "
        "LLM_NODE_API_KEY) > defaults. See docs/configuration.md.",
    )
    mount.add_argument("mountpoint", type=Path, help="an existing directory, e.g. /models")
    mount.add_argument("--store", help="local store directory; downloads go here (created if missing; "
                       "default /var/lib/modelfs/store as root, ~/.local/share/modelfs/store otherwise)")
    mount.add_argument("--shared", action="append", help="shared directory (NFS) read in place; repeatable, "
                       "searched in the order given")
    mount.add_argument("--router", action="append", help="llmlb router base URL, e.g. http://router:8080; "
                       "repeatable, tried in order with failover")
    mount.add_argument("--router-token", help="router API key (visible in ps: prefer MODELFS_ROUTER_TOKEN or "
                       "router_token in the config file)")
    mount.add_argument("--config", type=Path, help="TOML config file (keys as these flags, with _)")
    mount.add_argument("--foreground", action="store_true", help="stay in the foreground (systemd, containers); log "
                       "to stderr")
    mount.add_argument("--no-supervisor", action="store_true", help="serve in this very process, without a "
                       "supervisor: nothing restarts it, and if it dies the mount is left stale (for debugging)")
    mount.add_argument("--allow-other", action="store_true", default=None,
                       help="let other users read the mount (non-root needs user_allow_other in /etc/fuse.conf)")
    mount.add_argument("--shared-timeout", type=float, help="seconds before a shared directory that does not "
                       "answer is skipped as unavailable (default 2)")
    mount.add_argument("--connect-timeout", type=float, help="seconds to connect to a router (default 5)")
    mount.add_argument("--read-timeout", type=float, help="seconds a router may stall mid-response (default 30)")
    mount.add_argument("--retries", type=int, help="retries of a failed download, with backoff (default 3)")
    mount.add_argument("--store-max-size", help="evict least-recently-used downloaded models to keep the store "
                       "under this size, e.g. 200G (default: no limit)")
    mount.add_argument("--passthrough", choices=("auto", "on", "off"), help="FUSE passthrough, the kernel reading "
                       "complete model files itself: auto (default) uses it when kernel, privileges and library "
                       "allow; on refuses to mount without it; off serves every read from the daemon")
    mount.add_argument("--log-file", type=Path, help="where a background daemon logs (default "
                       "/var/log/modelfs.log as root, ~/.local/state/modelfs/modelfs.log otherwise)")
    mount.add_argument("--debug", action="store_true", default=None, help="log every request")
    mount.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP on this address, "
                       "e.g. 127.0.0.1:9464 (default: off)")

    umount = commands.add_parser("umount", help="unmount modelfs (also clears a mount left by a crashed daemon)")
    umount.add_argument("mountpoint", type=Path)

    restart = commands.add_parser(
        "restart", help="hand a live mount to the modelfs now installed, without unmounting",
        description="Starts a new serving daemon (of the modelfs installed now, with the config file as it is "
        "now) and hands it the live mount: open files, mappings and downloads go on after a short pause. Refused, "
        "with the running daemon left alone, if the installed modelfs would speak FUSE differently.")
    restart.add_argument("mountpoint", type=Path)
    restart.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the new daemon")

    status = commands.add_parser("status", help="what a running modelfs is doing: models, downloads, sources",
                                 description="Reads the running daemon's state through its extended attributes.")
    status.add_argument("mountpoint", type=Path, nargs="?", default=Path("/models"))
    status.add_argument("--json", action="store_true", help="machine-readable output")

    prefetch = commands.add_parser(
        "prefetch", help="download models ahead of time through the running mount",
        description="Opens each model through the mount, so it joins the same single download task as any "
        "reader, and waits for it to complete, showing bytes, rate and ETA (no bar when not on a terminal).")
    prefetch.add_argument("names", nargs="+", metavar="NAME", help="model name, e.g. org/model")
    prefetch.add_argument("--mount", type=Path, default=Path("/models"), help="the modelfs mountpoint")
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("store", "shared", "router", "router_token", "shared_timeout", "connect_timeout", "read_timeout",
            "retries", "store_max_size", "passthrough", "allow_other", "debug", "metrics")
    return {key: getattr(args, key) for key in keys}


def setup_logging(debug: bool, stream: Any = None) -> None:
    """Plain lines; under journald (JOURNAL_STREAM) without our own timestamps, as it adds its own."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt, stream=stream or sys.stderr,
                        force=True)
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)


def default_log_file() -> Path:
    if os.geteuid() == 0:
        return Path("/var/log/modelfs.log")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "modelfs/modelfs.log"


def cmd_mount(args: argparse.Namespace) -> int:
    serving = args.foreground and (args.no_supervisor or os.environ.get("NOTIFY_SOCKET"))
    # A supervisor reads the settings only to refuse bad ones at once; its daemon reads them again and warns.
    config_log = logging.getLogger("modelfs.config")
    config_log.disabled = not serving
    try:
        config = load(_flags(args), args.config)
    except ConfigError as exc:
        print(f"modelfs: {exc}", file=sys.stderr)
        return 2
    finally:
        config_log.disabled = False
    mountpoint = args.mountpoint.absolute()
    if serving:
        from .mount import HANDOVER_EXIT, MountError, run

        setup_logging(config.debug)
        try:
            status = run(config, mountpoint)
        except MountError as exc:
            log.error("%s", exc)
            from .fdstore import notify

            notify(f"STATUS=error: {exc}")
            return 1
        if status == HANDOVER_EXIT:  # the next daemon waits for this process to be gone: no teardown
            logging.shutdown()
            os._exit(status)
        return status
    if args.foreground:
        setup_logging(config.debug)
        return _supervise(args, mountpoint, lambda message: None)
    return _daemonize(args, config, mountpoint, args.log_file or default_log_file())


def _daemon_args(args: argparse.Namespace, mountpoint: Path) -> list[str]:
    """The `modelfs mount` arguments of the serving daemon: these flags, paths made absolute. The router key goes
    by the environment, never on a command line."""
    out = [str(mountpoint)]
    paths = {"store": "--store", "config": "--config"}
    for key, flag in paths.items():
        if getattr(args, key):
            out += [flag, str(Path(getattr(args, key)).absolute())]
    out += [item for path in args.shared or () for item in ("--shared", str(Path(path).absolute()))]
    out += [item for url in args.router or () for item in ("--router", url)]
    values = {"shared_timeout": "--shared-timeout", "connect_timeout": "--connect-timeout",
              "read_timeout": "--read-timeout", "retries": "--retries", "store_max_size": "--store-max-size",
              "passthrough": "--passthrough", "metrics": "--metrics"}
    for key, flag in values.items():
        if getattr(args, key) is not None:
            out += [flag, str(getattr(args, key))]
    for key, flag in {"allow_other": "--allow-other", "debug": "--debug"}.items():
        if getattr(args, key):
            out.append(flag)
    if args.router_token:
        os.environ["MODELFS_ROUTER_TOKEN"] = args.router_token
    return out


def _supervise(args: argparse.Namespace, mountpoint: Path, ready: Callable[[str], None]) -> int:
    from .supervisor import Supervisor

    try:
        return Supervisor(_daemon_args(args, mountpoint), mountpoint, ready).run()
    except OSError as exc:
        log.error("cannot supervise %s: %s", mountpoint, exc)
        ready(f"error: cannot supervise {mountpoint}: {exc}")
        return 1


def _daemonize(args: argparse.Namespace, config: Config, mountpoint: Path, log_file: Path) -> int:
    """Fork the supervisor, which starts the serving daemon; return once the mount is live, or why it is not."""
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    except OSError as exc:
        print(f"modelfs: cannot open log file {log_file}: {exc.strerror}", file=sys.stderr)
        return 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.close(read_end)
        os.setsid()
        os.chdir("/")  # never pin the directory `modelfs mount` was started from (every path is absolute by now)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        setup_logging(config.debug)
        status = 1
        try:
            status = _supervise(args, mountpoint, lambda message: _tell(write_end, message))
        except BaseException as exc:  # noqa: BLE001 - report anything to the waiting parent
            log.exception("modelfs failed")
            _tell(write_end, f"error: {exc}")
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.readline().strip()
    if answer == "ok":
        print(f"modelfs: mounted {mountpoint} (pid {pid}, log {log_file})")
        return 0
    reason = answer.removeprefix("error: ") or f"the daemon exited before mounting; see {log_file}"
    print(f"modelfs: {reason}", file=sys.stderr)
    return 1


def _tell(fd: int, message: str) -> None:
    try:
        os.write(fd, (message + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def cmd_umount(args: argparse.Namespace) -> int:
    from .fusermount import MountError, is_stale, unmount

    mountpoint = args.mountpoint.absolute()
    try:
        if is_stale(mountpoint):
            unmount(mountpoint, lazy=True)
            print(f"modelfs: cleared stale mount {mountpoint}")
            return 0
        if not os.path.ismount(mountpoint):
            print(f"modelfs: {mountpoint} is not mounted", file=sys.stderr)
            return 1
        unmount(mountpoint)
    except MountError as exc:
        print(f"modelfs: cannot unmount {mountpoint}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .restart import cmd_restart
    from .status import cmd_prefetch, cmd_status

    commands = {"mount": cmd_mount, "umount": cmd_umount, "restart": cmd_restart, "status": cmd_status,
                "prefetch": cmd_prefetch}
    return commands[args.command](args)
