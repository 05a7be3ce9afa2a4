"""Deployment, for real: the systemd unit (verified, its Type=notify protocol, its hardening), stale mounts after a
crash, the fstab mount helper through mount(8), and a fleet of mounts behind a caching nginx.

systemd is not PID 1 here, so the unit's behaviour is checked piece by piece: `systemd-analyze verify` for the
files, NOTIFY_SOCKET for readiness, KillSignal and `modelfs umount` for stopping, setpriv for the capability
bounding set and NoNewPrivileges, unshare for why no mount-namespace option may be used.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs import mounthelper
from modelfs.config import Config, from_file
from tests.support.models import gguf_bytes, write_model
from tests.support.mount import BENIGN_ERRORS, fuse_missing, stop_daemon
from tests.support.procs import wait_for
from tests.support.sshfs import is_mounted

MB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
BIN = Path(sys.executable).parent
MODELFS = [str(BIN / "modelfs")] if (BIN / "modelfs").exists() else [sys.executable, "-m", "modelfs"]
HELPER = BIN / "mount.fuse.modelfs"
HELPER_LINK = Path("/sbin/mount.fuse.modelfs")
UNIT_BIN = "/usr/local/bin/modelfs"  # the path the shipped unit assumes

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- helpers


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def need_fuse() -> None:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    need("fusermount3")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without modelfs/llmlb settings or proxies (loopback traffic must stay direct)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODELFS_", "LLM_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(extra)
    return env


def bad_log_lines(text: str) -> list[str]:
    """ERRORs and tracebacks, less the benign libfuse lines tests.support.mount explains (a reply to a dropped
    request)."""
    return [line for line in text.splitlines()
            if ("Traceback" in line or " ERROR " in line or " CRITICAL " in line)
            and not any(benign in line for benign in BENIGN_ERRORS)]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> values of a unit file (repeated keys keep every value)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return 0


class Daemon:
    """`modelfs mount --foreground` as systemd runs it (Type=notify), with a NOTIFY_SOCKET bound by the test."""

    def __init__(self, tmp: Path, mountpoint: Path, store: Path, *args: str, prefix: tuple[str, ...] = (),
                 tag: str = "d") -> None:
        self.mountpoint = mountpoint
        self.log = tmp / f"{tag}.log"
        self.sock_path = tmp / f"{tag}.notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, *MODELFS, "mount", str(mountpoint), "--store", str(store), "--foreground", *args],
                stdout=log, stderr=log, env=clean_env(NOTIFY_SOCKET=str(self.sock_path)),
            )

    def expect(self, message: str, timeout: float = 15) -> None:
        """Wait for a notification that contains `message` (e.g. READY=1)."""
        deadline = time.monotonic() + timeout
        while not any(message in m.split("\n") for m in self.messages):
            try:
                self.messages.append(self.sock.recv(4096).decode())
                continue
            except TimeoutError:
                pass
            if self.proc.poll() is not None:
                try:  # it may have sent the message just before exiting
                    self.messages.append(self.sock.recv(4096).decode())
                    continue
                except TimeoutError:
                    pass
                raise AssertionError(f"modelfs exited ({self.proc.returncode}) before {message}; got "
                                     f"{self.messages}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {message} within {timeout}s; got {self.messages}:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        stop_daemon(self.proc, self.mountpoint)
        self.sock.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


# --------------------------------------------------------------------------- the unit files


def test_unit_and_inference_dropin_pass_systemd_analyze_verify(tmp_path):
    need("systemd-analyze")
    if len(MODELFS) > 1:
        pytest.skip("no modelfs console script next to this python (pip install -e .)")
    unit_text = (UNITS / "modelfs.service").read_text()
    assert f"ExecStart={UNIT_BIN} mount /models " in unit_text and "ExecStop=" not in unit_text
    # verify insists that binaries exist: point the copy at this install, as deployment.md tells admins to.
    units = tmp_path / "units"
    (units / "inference.service.d").mkdir(parents=True)
    (units / "modelfs.service").write_text(unit_text.replace(UNIT_BIN, MODELFS[0]))
    (units / "inference.service").write_text("[Unit]\nDescription=stand-in inference server\n\n"
                                              "[Service]\nExecStart=/bin/sleep infinity\n")
    shutil.copy(UNITS / "inference-after-modelfs.conf", units / "inference.service.d" / "after-modelfs.conf")

    def verify(*names: str, debug: bool = False) -> list[str]:
        env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug") if debug else os.environ
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(units / n) for n in names)],
                                capture_output=True, text=True, timeout=30, cwd=units, env=env)
        return (result.stdout + result.stderr).splitlines()

    # On this machine verify prints nothing for good units; elsewhere it may complain about the host's own
    # units, which are not ours to judge. Anything about our files is a failure.
    ours = [line for line in verify("modelfs.service", "inference.service")
            if "modelfs" in line or "inference" in line or str(units) in line]
    assert ours == []
    # The drop-in is read: starting the inference unit pulls modelfs in.
    assert any("modelfs.service: Installed new job modelfs.service/start" in line
               for line in verify("inference.service", debug=True))
    # And verify does report problems in our files (so the empty answer above means something).
    (units / "modelfs.service").write_text(unit_text.replace(UNIT_BIN, MODELFS[0]).replace(
        "KillSignal=SIGTERM", "KillSignal=SIGTERM\nProtectModels=yes"))
    assert any("Unknown key" in line and "ProtectModels" in line for line in verify("modelfs.service"))


def test_unit_settings_and_no_mount_namespace():
    unit = unit_settings(UNITS / "modelfs.service")
    expected = {
        "Service.Type": ["notify"], "Service.NotifyAccess": ["main"], "Service.Restart": ["on-failure"],
        "Service.KillSignal": ["SIGTERM"], "Service.ExecStartPre": ["/bin/mkdir -p /models"],
        "Unit.After": ["network-online.target"], "Unit.Wants": ["network-online.target"],
        "Unit.RequiresMountsFor": ["/var/lib/modelfs"], "Service.DeviceAllow": ["/dev/fuse rw"],
        # Restarts keep the mount (tests/test_restart.py plays systemd's part of each): the fd store holds the
        # connection, `systemctl restart` hands over (SIGUSR1, exit 75), `reload` does the same and 75 restarts.
        "Service.FileDescriptorStoreMax": ["16"], "Service.RestartKillSignal": ["SIGUSR1"],
        "Service.ExecReload": ["/bin/kill -USR1 $MAINPID"], "Service.RestartForceExitStatus": ["75"],
        "Service.SuccessExitStatus": ["75"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert unit["Service.ExecStart"] == [f"{UNIT_BIN} mount /models --config /etc/modelfs/config.toml --foreground"]
    assert "Service.TimeoutStopSec" in unit
    assert "Service.ExecStop" not in unit  # it would run on `systemctl restart` too, and unmount
    # No secret on the command line.
    assert "token" not in " ".join(unit["Service.ExecStart"]).lower()
    # These give the service namespaces of its own: a mount namespace would keep /models in there (see the next
    # test), a user namespace takes CAP_SYS_ADMIN away from the host, a network one the routers.
    namespaced = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateUsers",
                  "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
                  "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
                  "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
                  "RootDirectory", "RootImage", "MountAPIVFS", "DynamicUser", "MountFlags", "PrivateNetwork",
                  "NetworkNamespacePath", "ProtectHostname"}
    assert not namespaced & {key.split(".", 1)[1] for key in unit}


def test_a_private_mount_namespace_would_hide_the_mount(tmp_path, dirs):
    """What the unit avoids: a mount made in a namespace set up as systemd does (slave, then shared) is invisible
    to the host, although modelfs reports it live."""
    need_fuse()
    need("unshare")
    write_model(dirs["store"], "m", gguf_bytes(1000))
    script = 'mount --make-rshared / && exec "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh", *MODELFS, "mount",
         str(dirs["mnt"]), "--store", str(dirs["store"]), "--log-file", str(tmp_path / "ns.log")],
        capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0, result.stderr
    pid = int(re.search(r"\(pid (\d+),", result.stdout).group(1))
    try:
        assert "mounted" in result.stdout
        assert not is_mounted(str(dirs["mnt"])) and not (dirs["mnt"] / "m.gguf").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the namespaced daemon to exit")
    assert "unmounted" in (tmp_path / "ns.log").read_text()


def test_hardening_leaves_enough_to_mount_serve_and_unmount(tmp_path, dirs, daemons):
    """The unit's CapabilityBoundingSet and NoNewPrivileges, applied with setpriv: modelfs works within them, and
    not without CAP_SYS_ADMIN (so they are what bounds it)."""
    need_fuse()
    need("setpriv")
    unit = unit_settings(UNITS / "modelfs.service")
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    caps = unit["Service.CapabilityBoundingSet"][0].split()
    bounding = "-all," + ",".join("+" + cap.removeprefix("CAP_").lower() for cap in caps)
    setpriv = ("setpriv", "--no-new-privs", "--bounding-set", bounding, "--inh-caps", "-all")
    data = gguf_bytes(100_000)
    write_model(dirs["store"], "org/m", data)

    d = Daemon(tmp_path, dirs["mnt"], dirs["store"], prefix=setpriv, tag="hardened")
    daemons.append(d)
    d.expect("READY=1")
    assert (dirs["mnt"] / "org" / "m.gguf").read_bytes() == data
    effective = int(re.search(r"CapEff:\s*([0-9a-f]+)", Path(f"/proc/{d.proc.pid}/status").read_text()).group(1), 16)
    assert effective == sum(1 << {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_SYS_ADMIN": 21}[c]
                            for c in caps)
    # KillSignal: the daemon unmounts itself within them.
    d.proc.send_signal(signal.SIGTERM)
    d.expect("STOPPING=1")
    assert d.wait() == 0
    assert bad_log_lines(d.log_text()) == []
    assert "read-ahead" not in d.log_text()  # raising the mount's read-ahead in /sys works within them too

    without = ("setpriv", "--no-new-privs", "--bounding-set", bounding.replace(",+sys_admin", ""), "--inh-caps",
               "-all")
    result = subprocess.run([*without, *MODELFS, "mount", str(dirs["mnt"]), "--store", str(dirs["store"]),
                             "--foreground"], capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 1 and "cannot mount" in result.stderr
    assert not is_mounted(str(dirs["mnt"]))


def test_config_example_lists_every_setting_and_loads(tmp_path):
    example = (UNITS / "config.toml.example").read_text()
    # `#key = value` lines are settings; `# text` lines are prose.
    settings = re.findall(r"^#([a-z_]+ = .*)$", example, flags=re.M)
    keys = [line.split(" = ")[0] for line in settings]
    assert sorted(keys) == sorted(f.name for f in Config.__dataclass_fields__.values())
    uncommented = tmp_path / "config.toml"
    uncommented.write_text("\n".join(settings) + "\n")
    loaded = from_file(uncommented)
    assert set(loaded) == set(keys)
    assert loaded["shared_timeout"] == Config().shared_timeout and loaded["retries"] == Config().retries


# --------------------------------------------------------------------------- Type=notify, stop, stale mounts


@pytest.mark.parametrize("stop", ["umount", "KillSignal"])
def test_notify_ready_when_live_and_stopping_on_unmount(tmp_path, dirs, daemons, stop):
    need_fuse()
    data = gguf_bytes(200_000)
    write_model(dirs["store"], "org/m", data)
    d = Daemon(tmp_path, dirs["mnt"], dirs["store"])
    daemons.append(d)
    d.expect("READY=1")
    # At the moment systemd would start the inference unit, /models is mounted and answers.
    assert os.path.ismount(dirs["mnt"])
    assert (dirs["mnt"] / "org" / "m.gguf").read_bytes() == data
    assert not any("STOPPING=1" in m for m in d.messages)
    if stop == "umount":  # an admin's `modelfs umount` (or `umount /models`) stops the unit too
        result = subprocess.run([*MODELFS, "umount", str(dirs["mnt"])], capture_output=True, text=True,
                                timeout=30, env=clean_env())
        assert result.returncode == 0, result.stderr
    else:
        d.proc.send_signal(signal.SIGTERM)
    d.expect("STOPPING=1")
    assert d.wait() == 0  # a clean stop: Restart=on-failure leaves it stopped
    assert not is_mounted(str(dirs["mnt"]))
    assert bad_log_lines(d.log_text()) == []


def test_stale_mount_after_kill9_is_recovered_by_mount_and_by_umount(tmp_path, dirs, daemons):
    need_fuse()
    data = gguf_bytes(300_000)
    write_model(dirs["store"], "m", data)
    first = Daemon(tmp_path, dirs["mnt"], dirs["store"], tag="first")
    daemons.append(first)
    first.expect("READY=1")
    first.proc.kill()  # SIGKILL, and nobody unmounts
    first.wait()
    with pytest.raises(OSError) as stale:
        os.statvfs(dirs["mnt"])  # statfs: never answered from the kernel's attribute cache
    assert stale.value.errno == errno.ENOTCONN

    # What Restart=on-failure does next: a new daemon on the same mountpoint clears it and serves.
    second = Daemon(tmp_path, dirs["mnt"], dirs["store"], tag="second")
    daemons.append(second)
    second.expect("READY=1")
    assert (dirs["mnt"] / "m.gguf").read_bytes() == data
    warnings = [line for line in second.log_text().splitlines() if "stale mount" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], second.log_text()

    # `modelfs umount` (an admin) clears a stale mount too.
    second.proc.kill()
    second.wait()
    # The kernel answers stat from its attribute cache (1 s) until it has to ask the dead daemon.
    wait_for(lambda: stat_errno(dirs["mnt"]) == errno.ENOTCONN, timeout=5, what="stat to see the stale mount")
    result = subprocess.run([*MODELFS, "umount", str(dirs["mnt"])], capture_output=True, text=True, timeout=30,
                            env=clean_env())
    assert result.returncode == 0 and "cleared stale mount" in result.stdout, result.stderr
    assert not is_mounted(str(dirs["mnt"])) and os.path.isdir(dirs["mnt"])
    assert bad_log_lines(second.log_text()) == []


def test_stale_mount_is_recognised_right_after_a_crash(tmp_path, dirs, daemons):
    from modelfs.mount import is_stale

    need_fuse()
    write_model(dirs["store"], "m", gguf_bytes(1000))
    d = Daemon(tmp_path, dirs["mnt"], dirs["store"])
    daemons.append(d)
    d.expect("READY=1")
    (dirs["mnt"] / "m.gguf").read_bytes()  # the root's attributes are now in the kernel's cache (1 s)
    d.proc.kill()
    d.wait()
    assert is_stale(dirs["mnt"])  # what `modelfs mount` and `modelfs umount` decide on


# --------------------------------------------------------------------------- fstab


def test_mount_helper_options():
    flags, _ = mounthelper.to_flags(mounthelper.split_options([
        "rw,nosuid,nodev,noexec,relatime,defaults,auto,noauto,user,nouser,nofail,_netdev,x-systemd.automount,"
        "store=/s,shared_dirs=/a:/b,router=http://r1:8080|http://r2:8080/x%2Cy,config=/etc/m.toml,allow_other,"
        "debug,shared_timeout=3,log_file=/l",
    ]))
    assert flags == ["--store", "/s", "--shared", "/a", "--shared", "/b", "--router", "http://r1:8080",
                     "--router", "http://r2:8080/x%2Cy", "--config", "/etc/m.toml", "--allow-other", "--debug",
                     "--shared-timeout", "3", "--log-file", "/l"]
    for bad, reason in [("colour=blue", "unknown option 'colour=blue'"), ("store=", "needs a value"),
                        ("allow_other=1", "takes no value"), ("router_token=sk-1", "everyone can read")]:
        with pytest.raises(mounthelper.OptionError, match=reason):
            mounthelper.to_flags([bad])
    assert mounthelper.to_flags(["colour=blue"], sloppy=True) == ([], ["colour=blue"])


@pytest.fixture
def helper_link() -> Iterator[Path]:
    """/sbin/mount.fuse.modelfs -> this install's console script, created for the test if absent."""
    need_fuse()
    if not HELPER.exists():
        pytest.skip(f"{HELPER} missing: pip install -e . (pyproject's mount.fuse.modelfs script)")
    # Test runs in parallel (several checkouts, several sessions) take turns: one must not remove the link
    # another is using.
    with open("/tmp/modelfs-test-mount-helper.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = False
        if HELPER_LINK.is_symlink() or HELPER_LINK.exists():
            if HELPER_LINK.resolve() != HELPER.resolve():
                pytest.skip(f"{HELPER_LINK} belongs to another install ({HELPER_LINK.resolve()})")
        else:
            HELPER_LINK.symlink_to(HELPER)
            created = True
        try:
            yield HELPER_LINK
        finally:
            if created:
                HELPER_LINK.unlink()


def test_fstab_mount_helper_through_mount8(tmp_path, dirs, helper_link):
    need_fuse()
    need("mount", "umount")
    mnt = dirs["mnt"]
    local = gguf_bytes(150_000, seed=1)
    shared = gguf_bytes(250_000, seed=2)
    write_model(dirs["store"], "local", local)
    write_model(dirs["shared2"], "org/shared", shared)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # cwd: mount(8) canonicalizes a source that names an existing path; keep "modelfs" just a word.
        return subprocess.run(list(args), capture_output=True, text=True, timeout=30, cwd=tmp_path,
                              env=clean_env())

    def fstype_and_options() -> tuple[str, str]:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == str(mnt):
                return fields[2], fields[3]
        raise AssertionError(f"{mnt} not mounted")

    def unmount(log: Path) -> None:
        result = run("umount", str(mnt))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: "unmounted" in log.read_text(), what="the daemon to unmount and exit")
        assert not is_mounted(str(mnt))
        assert bad_log_lines(log.read_text()) == []

    # 1. mount(8) with an explicit type finds /sbin/mount.fuse.<subtype>; it returns once the mount is live.
    log1 = tmp_path / "helper1.log"
    result = run("mount", "-t", "fuse.modelfs", "-o",
                 f"store={dirs['store']},shared_dirs={dirs['shared']}:{dirs['shared2']},log_file={log1}",
                 "modelfs", str(mnt))
    assert result.returncode == 0, result.stderr
    assert (mnt / "local.gguf").read_bytes() == local
    assert (mnt / "org" / "shared.gguf").read_bytes() == shared
    assert fstype_and_options()[0] == "fuse.modelfs"
    unmount(log1)

    # 2. A real fstab line (mount -T reads it instead of /etc/fstab): `mount /models` becomes `mount MNT`.
    log2 = tmp_path / "helper2.log"
    config = tmp_path / "config.toml"
    config.write_text(f'store = "{dirs["store"]}"\nshared = ["{dirs["shared2"]}"]\n')
    fstab = tmp_path / "fstab"
    fstab.write_text(f"modelfs {mnt} fuse.modelfs config={config},allow_other,log_file={log2},_netdev,nofail,"
                     "x-systemd.requires=network-online.target 0 0\n")
    result = run("mount", "-T", str(fstab), str(mnt))
    assert result.returncode == 0, result.stderr
    assert (mnt / "org" / "shared.gguf").read_bytes() == shared
    assert "allow_other" in fstype_and_options()[1].split(",")
    unmount(log2)

    # 3. An option modelfs does not know: a clear message, mount(8) exits 1, nothing is mounted.
    result = run("mount", "-t", "fuse.modelfs", "-o", f"store={dirs['store']},colour=blue", "modelfs", str(mnt))
    assert result.returncode == 1
    assert "mount.fuse.modelfs: unknown option 'colour=blue'" in result.stderr
    assert not is_mounted(str(mnt))
    # 4. A setting modelfs rejects (here from the config file): exit 1, the reason, nothing mounted.
    config.write_text("retries = -1\n")
    result = run("mount", "-T", str(fstab), str(mnt))
    assert result.returncode == 1 and "retries" in result.stderr
    assert not is_mounted(str(mnt))


def test_fstab_line_becomes_a_remote_fs_mount_unit(tmp_path):
    generator = Path("/lib/systemd/system-generators/systemd-fstab-generator")
    if not os.access(generator, os.X_OK):
        pytest.skip(f"{generator} missing")
    fstab = tmp_path / "fstab"
    fstab.write_text("modelfs /models fuse.modelfs config=/etc/modelfs/config.toml,allow_other,_netdev 0 0\n")
    out = tmp_path / "generated"
    out.mkdir()
    result = subprocess.run([str(generator), str(out), str(out), str(out)], capture_output=True, text=True,
                            timeout=30, env=dict(os.environ, SYSTEMD_FSTAB=str(fstab), SYSTEMD_PROC_CMDLINE=""))
    assert result.returncode == 0, result.stderr
    unit = (out / "models.mount").read_text()
    assert "Where=/models" in unit and "Type=fuse.modelfs" in unit
    # _netdev: a network filesystem, mounted after the network is online (remote-fs.target).
    assert (out / "remote-fs.target.requires" / "models.mount").exists()


# --------------------------------------------------------------------------- a fleet behind a caching nginx


def test_fleet_behind_caching_nginx_downloads_each_model_once(tmp_path, router, nginx, mount):
    token = "sk-fleet-test"
    r = router(token=token)
    data = gguf_bytes(4 * MB + 4321)
    write_model(r.models_dir, "fleet", data)  # a top-level name: stat asks the router with HEAD
    proxy = nginx(r.port)
    nodes = []
    for node in ("a", "b"):
        (tmp_path / f"mnt-{node}").mkdir()
        nodes.append(mount("--router", proxy.url, mountpoint=tmp_path / f"mnt-{node}",
                           store=tmp_path / f"store-{node}", env={"MODELFS_ROUTER_TOKEN": token}))
    a, b = nodes

    r.control(rate=2 * MB)  # node A's download, which fills the cache, takes ~2 s
    got: dict[str, bytes | BaseException] = {}

    def read_a() -> None:
        try:
            got["a"] = a.model("fleet").read_bytes()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            got["a"] = exc

    reader = threading.Thread(target=read_a)
    reader.start()
    wait_for(lambda: r.blob_gets("fleet") == 1, what="node A's download to reach the router")
    # Node B's stat is a HEAD: passed to the router, not queued behind the cache fill.
    started = time.monotonic()
    assert os.stat(b.model("fleet")).st_size == len(data)
    assert time.monotonic() - started < 1.0
    got["b"] = b.model("fleet").read_bytes()  # waits on nginx's cache lock, then a cache hit
    reader.join(timeout=30)
    assert got["a"] == data and got["b"] == data
    for node in ("a", "b"):
        final = tmp_path / f"store-{node}" / "fleet" / "model.gguf"
        wait_for(final.exists, what=f"node {node}'s store to hold the model")
        assert final.read_bytes() == data

    # The router sent the model once, whole, to nginx; every request carried the node's key.
    assert r.blob_gets("fleet") == 1 and r.bytes_sent("fleet") == len(data)
    requests = [q for q in r.stats()["requests"] if q["name"] == "fleet"]
    assert requests and all(q["auth"] == token for q in requests)
    gets = [line.split()[3] for line in proxy.log_lines("/v0/models/blob/fleet") if line.startswith("GET ")]
    assert gets.count("MISS") == 1 and gets.count("HIT") >= 1, gets

    # A resumed download (Range, no validator: llmlb sends none) is answered from the cache with 206.
    request = urllib.request.Request(f"{proxy.url}/v0/models/blob/fleet",
                                     headers={"Range": "bytes=1000000-", "Authorization": f"Bearer {token}"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000000-{len(data) - 1}/{len(data)}"
        assert response.read() == data[1_000_000:]
    assert r.blob_gets("fleet") == 1


def test_deployment_doc_carries_the_tested_files():
    doc = (REPO / "docs" / "deployment.md").read_text()
    for name in ("nginx-modelfs-cache.conf", "inference-after-modelfs.conf", "modelfs.service"):
        text = (UNITS / name).read_text()
        assert text in doc, f"docs/deployment.md does not show systemd/{name} verbatim"
