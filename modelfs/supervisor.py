"""The supervisor: a small process that keeps a mount's /dev/fuse descriptor and state alive for the daemon serving
it, for mounts systemd does not run (`modelfs mount` in the background or the foreground, fstab, containers).

It plays systemd's part of the fd-store protocol (`fdstore`) for its one child: the daemon mounts, gives it the
descriptors (FDSTORE=1) and says READY=1; when the daemon dies, a new one is started with them (LISTEN_FDS) and
resumes the live connection. A planned restart (SIGUSR1, which `modelfs restart` sends) starts the next daemon
first, lets it import everything, then has the old one drain and hand over, so the pause is only the take-over.
Crashes are retried with backoff; a crash loop ends with the supervisor itself answering every request with EIO
(never a hang) until the mount is unmounted or `modelfs restart` tries again. Killing the supervisor kills its
daemon too (PR_SET_PDEATHSIG): the mount is then stale, as after any FUSE daemon's death.

Pure Python on purpose (no pyfuse3, no trio): it is the part that outlives upgrades.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import fdstore, fusedev

log = logging.getLogger(__name__)

#: Exit status of a daemon that handed the mount over (resume.HANDOVER_EXIT; not imported: that needs trio).
HANDOVER_EXIT = 75
#: Delays before starting a daemon again after one that died before serving (READY=1), one per such death in a
#: row; one more and the supervisor gives up. A daemon that did serve is restarted at once.
BACKOFF = (0.0, 0.5, 1.0, 2.0, 4.0)
#: ...unless daemons keep dying after serving: this many deaths within CRASH_WINDOW seconds is a crash loop too.
CRASH_LIMIT = 10
CRASH_WINDOW = 60.0
#: How long the next daemon of a planned restart may take to get ready before the restart is given up.
STANDBY_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def runtime_dir() -> Path:
    """Where supervisors put their notification sockets: root's under /run, a user's under XDG_RUNTIME_DIR."""
    if os.geteuid() == 0:
        return Path("/run/modelfs")
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "modelfs" if base else Path(f"/tmp/modelfs-{os.geteuid()}")


class CrashPolicy:
    """When to start a daemon again after one died, and when to stop trying (pure: the clock is given)."""

    def __init__(self) -> None:
        self.quick = 0  # daemons in a row that died before serving
        self.deaths: list[float] = []  # when daemons died, within CRASH_WINDOW

    def died(self, served: bool, now: float) -> float | str:
        """The delay before the next daemon, or why there will be none."""
        self.deaths = [t for t in self.deaths if now - t < CRASH_WINDOW] + [now]
        self.quick = 0 if served else self.quick + 1
        if self.quick > len(BACKOFF):
            return f"{self.quick} times in a row before serving"
        if len(self.deaths) >= CRASH_LIMIT:
            return f"{len(self.deaths)} times in {CRASH_WINDOW:.0f}s"
        return BACKOFF[self.quick - 1] if self.quick else 0.0


@dataclass
class Child:
    pid: int
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    go: int = -1  # standby: write end of the pipe it waits on
    prepared: bool = False  # standby: imported and waiting
    status: str = ""


class Supervisor:
    """Runs and restarts the serving daemon of one mountpoint; `run` returns the exit status."""

    def __init__(self, argv: list[str], mountpoint: Path, ready: Callable[[str], None] = lambda message: None
                 ) -> None:
        self.argv = argv  # `modelfs mount` arguments; the daemon gets them plus --foreground
        self.mountpoint = mountpoint
        self.ready = ready  # told "ok" once the mount is live, or "error: ..." if it never was
        self.stored = fdstore.Store()
        self.child: Child | None = None
        self.standby: Child | None = None
        self.crashes = CrashPolicy()
        self.failed = ""  # why requests are answered with EIO; "" while a daemon serves
        self.respawn_at: float | None = None
        self.restart_from = 0
        self.stopping = False
        self.announced = False
        _remove_dead_sockets(runtime_dir())
        self.receiver = fdstore.Receiver(runtime_dir(), f"supervisor-{os.getpid()}.sock")
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.buffer = bytearray(fusedev.READ_BUFFER)

    # The loop.

    def run(self) -> int:
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, lambda *_: None)
        try:
            self.child = self._spawn()
            while True:
                try:
                    status = self._step()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except Exception:  # noqa: BLE001 - dying would take the daemon and the mount with it
                    log.exception("supervisor of %s: unexpected error; going on", self.mountpoint)
                    time.sleep(0.1)
                    continue
                if status is not None:
                    return status
        finally:
            self.receiver.close()
            self.stored.close()

    def _step(self) -> int | None:
        poller = select.poll()
        poller.register(self.wakeup_r, select.POLLIN)
        poller.register(self.receiver.fileno(), select.POLLIN)
        fuse = self._fuse() if self.child is None else None  # watched while no daemon serves it
        if fuse is not None:
            poller.register(fuse, select.POLLIN if self.failed else 0)
        timeout = None if self.respawn_at is None else max(0.0, self.respawn_at - time.monotonic())
        if self.standby is not None and not self.standby.prepared:
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        events = poller.poll(None if timeout is None else int(timeout * 1000) + 1)
        for fd, event in events:
            if fd == self.wakeup_r:
                for signum in os.read(self.wakeup_r, 64):
                    self._signal(signum)
            elif fd == self.receiver.fileno():
                self._messages()
            elif fd == fuse:
                if event & (select.POLLERR | select.POLLHUP):
                    if self.child is None:
                        log.info("%s was unmounted", self.mountpoint)
                        return 0
                elif self.failed and not fusedev.answer(fuse, self.buffer, errno.EIO,
                                                        functools.partial(_failed_status, self.failed)):
                    return 0
        status = self._reap()
        if status is not None:
            return status
        if self.respawn_at is not None and time.monotonic() >= self.respawn_at:
            self.respawn_at = None
            self.child = self._spawn()
        if self.standby is not None and not self.standby.prepared and \
                time.monotonic() - self.standby.started > STANDBY_TIMEOUT:
            log.error("restart given up: the new daemon was not ready within %.0fs", STANDBY_TIMEOUT)
            self._drop_standby()
        return None

    def _fuse(self) -> int | None:
        return self.stored.first("fuse")

    # Children.

    def _spawn(self, standby: bool = False) -> Child:
        held = self.stored.held()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "MODELFSD_", "NOTIFY_"))}
        env.update(NOTIFY_SOCKET=str(self.receiver.path), MODELFSD_SUPERVISOR=str(os.getpid()))
        if self.restart_from and not standby:
            env["MODELFSD_RESTART_FROM"] = str(self.restart_from)
        pid, go_w = start_daemon([sys.executable, "-m", "modelfs", "mount", *self.argv, "--foreground"], env, held,
                                 standby)
        log.info("started %sdaemon pid %d for %s%s", "the next " if standby else "", pid, self.mountpoint,
                 " with its live connection" if held and not standby else "")
        return Child(pid, go=go_w)

    def _reap(self) -> int | None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            self._messages()  # whatever it sent before dying (a new state journal) counts
            code = os.waitstatus_to_exitcode(status)
            if self.standby is not None and pid == self.standby.pid:
                log.error("the next daemon (pid %d) exited with %s before taking over; the running one goes on",
                          pid, _describe(code))
                self._drop_standby()
            elif self.child is not None and pid == self.child.pid:
                child, self.child = self.child, None
                result = self._ended(child, code)
                if result is not None:
                    return result

    def _ended(self, child: Child, code: int) -> int | None:
        """The serving daemon exited: stop, hand over, or restart it."""
        self.restart_from = time.monotonic_ns()
        fuse = self._fuse()
        if code == 0 or self.stopping:
            log.info("daemon pid %d exited (%s); %s is unmounted", child.pid, _describe(code), self.mountpoint)
            if fusedev.mount_device(self.mountpoint) is not None and fuse is not None and fusedev.connected(fuse):
                _unmount(self.mountpoint)
            return 0 if code in (0, HANDOVER_EXIT) or self.stopping else 1
        if fuse is None:
            reason = child.status or f"the daemon exited with {_describe(code)} before mounting"
            self.ready(f"error: {reason.removeprefix('error: ')}")
            return 1
        if not fusedev.connected(fuse):
            log.info("%s was unmounted while its daemon was gone", self.mountpoint)
            return 0
        if code == HANDOVER_EXIT:
            if not self._take_standby():
                self.child = self._spawn()
            log.info("daemon pid %d handed over to pid %d", child.pid, self.child.pid if self.child else -1)
            return None
        delay = self.crashes.died(child.ready_at is not None, time.monotonic())
        if isinstance(delay, str):
            self._fail(f"the daemon died {delay} (last: {_describe(code)}); see the log")
            return None
        log.warning("daemon pid %d died (%s); restarting it%s with the live connection", child.pid, _describe(code),
                    f" in {delay:.1f}s" if delay else "")
        if delay or not self._take_standby():  # died during a planned restart: the next daemon is ready
            self.respawn_at = time.monotonic() + delay
        return None

    def _take_standby(self) -> bool:
        """Let the daemon waiting for a planned restart take over now; False if there is none ready."""
        if self.standby is None or not self.standby.prepared:
            self._drop_standby()
            return False
        self.child, self.standby = self.standby, None
        os.write(self.child.go, self.restart_from.to_bytes(8, "little"))
        os.close(self.child.go)
        return True

    def _fail(self, reason: str) -> None:
        """Give up restarting: answer every request with EIO ourselves until unmounted or asked to try again."""
        self.failed = reason
        log.error("%s: giving up: %s. Requests now fail with EIO; fix the cause and run `modelfs restart %s` "
                  "(or unmount it)", self.mountpoint, reason, self.mountpoint)
        fuse = self._fuse()
        if fuse is not None:
            try:
                fusedev.resend(fuse)
            except OSError:
                pass

    def _drop_standby(self) -> None:
        if self.standby is None:
            return
        os.close(self.standby.go)  # end of file: it exits
        self.standby = None

    # Signals and messages.

    def _signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.stopping = True
            self._drop_standby()
            if self.child is not None:
                _kill(self.child.pid, signal.SIGTERM)
            else:
                _unmount(self.mountpoint)
                raise SystemExit(0)
        elif signum == signal.SIGUSR1:
            if self.failed or self.child is None:
                log.info("SIGUSR1: starting a daemon again for %s", self.mountpoint)
                self.failed = ""
                self.crashes = CrashPolicy()
                self.respawn_at = time.monotonic()
            elif self.standby is None and self.child.ready_at is not None:
                log.info("SIGUSR1: restarting the daemon of %s", self.mountpoint)
                self.standby = self._spawn(standby=True)

    def _messages(self) -> None:
        children = {child.pid: child for child in (self.child, self.standby) if child is not None}
        while (message := self.receiver.receive(set(children))) is not None:
            self._message(children[message.pid], message)

    def _message(self, child: Child, message: fdstore.Message) -> None:
        fields = message.fields
        if "STATUS" in fields:
            child.status = fields["STATUS"]
        self.stored.apply(message)
        if fields.get("MODELFSD_STANDBY") == "1" and child is self.standby and self.child is not None:
            child.prepared = True
            _kill(self.child.pid, signal.SIGUSR1)
        if fields.get("READY") == "1" and child is self.child:
            child.ready_at = time.monotonic()
            if not self.announced:
                self.announced = True
                self.ready("ok")



def _failed_status(reason: str, nodeid: int, name: bytes) -> bytes | None:
    """The root's `user.modelfs.status` once the supervisor gave up: why, and whom `modelfs restart` signals."""
    if nodeid != 1 or name != b"user.modelfs.status":
        return None
    return json.dumps({"state": "failed", "reason": reason, "pid": None, "held_by": "supervisor",
                       "supervisor_pid": os.getpid()}).encode()


def _unmount(mountpoint: Path) -> None:
    from .fusermount import unmount

    try:
        unmount(mountpoint, lazy=True)
    except Exception as exc:  # noqa: BLE001 - stopping must go on
        log.warning("cannot unmount %s: %s", mountpoint, exc)


def start_daemon(argv: list[str], env: dict[str, str], held: list[tuple[str, int]], standby: bool
                 ) -> tuple[int, int]:
    """Fork and exec a serving daemon with the descriptors `held` at 3, 4, ... (LISTEN_FDS, by name); with
    `standby`, also a pipe it waits on before taking over (MODELFSD_STANDBY_FD). (pid, write end of that pipe)."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if standby else (-1, -1)
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:  # the daemon-to-be
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != supervisor:  # the supervisor died before the line above: so do we
                os._exit(1)
            signal.set_wakeup_fd(-1)
            sources = [fcntl_dup(fd) for _, fd in held] + ([fcntl_dup(go_r)] if standby else [])
            for index, fd in enumerate(sources):
                os.dup2(fd, fdstore.LISTEN_FDS_START + index)
            if held:
                env.update(LISTEN_FDS=str(len(held)), LISTEN_FDNAMES=":".join(name for name, _ in held),
                           LISTEN_PID=str(os.getpid()))
            if standby:
                env["MODELFSD_STANDBY_FD"] = str(fdstore.LISTEN_FDS_START + len(held))
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    if standby:
        os.close(go_r)
    return pid, go_w


def _remove_dead_sockets(directory: Path) -> None:
    """The sockets of supervisors that were killed (nobody else removes them)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        pid = name.removeprefix("supervisor-").removesuffix(".sock")
        if not (name.startswith("supervisor-") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            (directory / name).unlink(missing_ok=True)
        except OSError:
            pass


def fcntl_dup(fd: int) -> int:
    """A duplicate above every descriptor the child will get, so that placing them never overwrites one."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)


def _kill(pid: int, signum: int) -> None:
    """Signal a child that may have just exited (it is reaped by the loop, which then sees why)."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"
