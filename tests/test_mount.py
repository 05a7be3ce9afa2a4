"""The foundation through a real mount: local store and shared directories in place, namespace, read-only,
misses, names as a security boundary, freshness and introspection."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

#: Every read here runs with FUSE passthrough and with the daemon read path.
pytestmark = pytest.mark.io_paths


def test_local_and_shared_reads_are_byte_identical_and_in_place(mount, dirs):
    local = write_model(dirs["store"], "llama", gguf_bytes(3_000_001))
    shared = write_model(dirs["shared"], "qwen", gguf_bytes(2_000_003))
    m = mount("--shared", str(dirs["shared"]))
    assert m.model("llama").read_bytes() == local.read_bytes()
    # A separate process reads it too, as an inference engine would.
    out = subprocess.run(["cat", str(m.model("qwen"))], capture_output=True, check=True).stdout
    assert out == shared.read_bytes()
    # Shared models are read in place: nothing was copied into the store.
    assert sorted(p.name for p in dirs["store"].rglob("*") if p.is_file()) == ["model.gguf"]
    assert os.getxattr(m.model("qwen"), "user.modelfs.source") == b"shared"
    assert os.getxattr(m.model("qwen"), "user.modelfs.path") == str(shared).encode()
    assert os.getxattr(m.model("llama"), "user.modelfs.source") == b"local"
    assert os.getxattr(m.model("llama"), "user.modelfs.path") == str(local).encode()


def test_gguf_reader_sees_identical_tensors(mount, dirs):
    gguf = pytest.importorskip("gguf")
    from tests.support.ggufmaker import make_gguf

    tensors = make_gguf(dirs["shared"] / "tiny" / "model.gguf", seed=7)
    make_gguf(dirs["store"] / "org" / "small" / "model.gguf", seed=8)
    m = mount("--shared", str(dirs["shared"]))
    reader = gguf.GGUFReader(m.model("tiny"))  # memory-mapped, as llama.cpp reads it
    got = {t.name: t.data for t in reader.tensors}
    assert set(got) == set(tensors)
    for name, data in tensors.items():
        assert (got[name].reshape(data.shape) == data).all()
    direct = gguf.GGUFReader(dirs["store"] / "org" / "small" / "model.gguf")
    mounted = gguf.GGUFReader(m.model("org/small"))
    for a, b in zip(direct.tensors, mounted.tensors, strict=True):
        assert a.name == b.name and (a.data == b.data).all()


def test_namespace_union_order_and_layouts(mount, dirs):
    write_model(dirs["store"], "both", b"GGUF-store")
    write_model(dirs["shared"], "both", b"GGUF-shared")
    write_model(dirs["shared"], "first", b"GGUF-shared1")
    write_model(dirs["shared2"], "first", b"GGUF-shared2")
    write_model(dirs["shared2"], "flat", b"GGUF-flat", flat=True)
    write_model(dirs["shared2"], "dup", b"GGUF-dup-flat", flat=True)
    write_model(dirs["shared2"], "dup", b"GGUF-dup-llmlb")
    write_model(dirs["shared"], "org/model", b"GGUF-org")
    (dirs["store"] / "hidden").mkdir()
    (dirs["store"] / "hidden" / ".model.gguf.partial").write_bytes(b"GGUF-partial")
    (dirs["store"] / ".dot.gguf").write_bytes(b"GGUF-dot")
    m = mount("--shared", str(dirs["shared"]), "--shared", str(dirs["shared2"]))
    listing = sorted(os.listdir(m.path))
    assert listing == ["both.gguf", "dup.gguf", "first.gguf", "flat.gguf", "org"]  # "hidden" holds no model
    assert os.listdir(m.path / "org") == ["model.gguf"]
    assert m.model("both").read_bytes() == b"GGUF-store"  # store wins
    assert m.model("first").read_bytes() == b"GGUF-shared1"  # shared dirs in the order given
    assert m.model("flat").read_bytes() == b"GGUF-flat"
    assert m.model("dup").read_bytes() == b"GGUF-dup-llmlb"  # the llmlb layout wins over flat
    assert m.model("org/model").read_bytes() == b"GGUF-org"
    assert os.listdir(m.path / "hidden") == []  # a partial download is never listed...
    for hidden in ("hidden/.model.gguf.partial", ".dot.gguf", "hidden.gguf"):
        with pytest.raises(FileNotFoundError):  # ...nor opened
            open(m.path / hidden, "rb")


def test_attributes_come_from_the_backing_file_and_inodes_are_stable(mount, dirs):
    path = write_model(dirs["shared"], "org/model", gguf_bytes(12_345))
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    m = mount("--shared", str(dirs["shared"]))
    st = os.stat(m.model("org/model"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_size == 12_345
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    dst = os.stat(m.path / "org")
    assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o555
    assert stat.S_IMODE(os.stat(m.path).st_mode) == 0o555
    time.sleep(1.2)  # past the kernel's entry timeout: the daemon is asked again
    assert os.stat(m.model("org/model")).st_ino == st.st_ino
    listed = {e.name: e.inode() for e in os.scandir(m.path / "org")}
    assert listed["model.gguf"] == st.st_ino


def test_every_write_operation_is_erofs(mount, dirs):
    write_model(dirs["store"], "llama", b"GGUF-local")
    m = mount()
    target = m.model("llama")
    attempts = {
        "create": lambda: open(m.path / "new.gguf", "wb"),
        "write": lambda: open(target, "r+b"),
        "append": lambda: open(target, "ab"),
        "truncate": lambda: os.truncate(target, 0),
        "unlink": lambda: os.unlink(target),
        "mkdir": lambda: os.mkdir(m.path / "dir"),
        "rmdir": lambda: os.rmdir(m.path / "org") if (m.path / "org").exists() else os.rmdir(m.path),
        "rename": lambda: os.rename(target, m.path / "other.gguf"),
        "symlink": lambda: os.symlink("/etc/passwd", m.path / "link.gguf"),
        "link": lambda: os.link(target, m.path / "hard.gguf"),
        "setxattr": lambda: os.setxattr(target, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(target, "user.modelfs.source"),
        "chmod": lambda: os.chmod(target, 0o666),
        "chown": lambda: os.chown(target, 1, 1),
        "utime": lambda: os.utime(target, (0, 0)),
        "mknod": lambda: os.mknod(m.path / "fifo.gguf", 0o600 | stat.S_IFIFO),
    }
    for op, attempt in attempts.items():
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno in (errno.EROFS, errno.EBUSY), op  # rmdir of the mount root is EBUSY
    assert target.read_bytes() == b"GGUF-local"


def test_miss_is_enoent_with_one_log_line_naming_the_places(mount, dirs):
    m = mount("--shared", str(dirs["shared"]))
    with pytest.raises(FileNotFoundError):
        open(m.model("nowhere"), "rb")
    log = m.log_text()
    lines = [line for line in log.splitlines() if "'nowhere' not found" in line]
    assert len(lines) == 1, log
    assert str(dirs["store"]) in lines[0] and str(dirs["shared"]) in lines[0]
    # A file that appears later is seen once the short negative caches expire.
    write_model(dirs["shared"], "nowhere", b"GGUF-late")
    deadline = time.monotonic() + 5
    while not m.model("nowhere").exists():
        assert time.monotonic() < deadline, "new model not visible within 5s"
        time.sleep(0.1)
    assert m.model("nowhere").read_bytes() == b"GGUF-late"


TRAVERSAL = [
    "../etc/passwd", "..", "../..", "a/../../etc", "%2e%2e/x.gguf", "..%2f..%2fetc.gguf", "\\..\\x.gguf",
    "UPPER.gguf", "sp ace.gguf", "semi;colon.gguf", "x.gguf/../../y.gguf", "~root.gguf", "$(id).gguf",
    ".gguf", "..gguf", "....gguf", "model.gguf.partial", "a\nb.gguf", "é.gguf",
]


def test_traversal_corpus_never_escapes(mount, dirs, tmp_path):
    secret = tmp_path / "secret"
    write_model(secret, "escape", b"GGUF-secret")
    write_model(dirs["store"], "ok", b"GGUF-ok")
    (dirs["shared"] / "escape").mkdir()
    (dirs["shared"] / "escape" / "model.gguf").symlink_to(secret / "escape" / "model.gguf")
    (dirs["shared"] / "evil").symlink_to(secret / "escape")
    write_model(secret, "inside", b"GGUF-in")
    (dirs["shared"] / "good").mkdir()
    target = dirs["shared2"] / "good.gguf"
    target.write_bytes(b"GGUF-linked")
    m = mount("--shared", str(dirs["shared"]))
    for name in TRAVERSAL:
        path = os.path.join(m.path, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EACCES), name
        else:  # only what resolves inside the mount to a real model may open: '..' from the root stays at /
            assert data in (b"GGUF-ok",) or os.path.realpath(path) == os.path.realpath(m.path.parent), name
    # Symlinks in a shared dir that point outside it are refused.
    for name in ("escape", "evil"):
        with pytest.raises(FileNotFoundError):
            open(m.model(name), "rb")
    assert "escape.gguf" not in os.listdir(m.path) and "evil.gguf" not in os.listdir(m.path)
    with pytest.raises(OSError) as info:
        os.stat(m.path / ("a" * 256 + ".gguf"))
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        os.stat(m.path / ("a" * 250 + ".gguf"))  # 255 bytes: a legal name that just isn't there
    assert info.value.errno == errno.ENOENT
    assert m.model("ok").read_bytes() == b"GGUF-ok"


def test_symlinks_inside_a_shared_dir_are_followed(mount, dirs):
    real = write_model(dirs["shared"], "real", b"GGUF-real")
    (dirs["shared"] / "alias").mkdir()
    (dirs["shared"] / "alias" / "model.gguf").symlink_to(real)
    m = mount("--shared", str(dirs["shared"]))
    assert m.model("alias").read_bytes() == b"GGUF-real"


def test_changed_shared_file_is_seen_on_next_open(mount, dirs):
    path = write_model(dirs["shared"], "live", b"GGUF-version-1")
    m = mount("--shared", str(dirs["shared"]))
    with open(m.model("live"), "rb") as held:
        assert held.read() == b"GGUF-version-1"
        # Same size, new content, new file (rename over it), as an admin or the router would replace it.
        tmp = path.with_name("tmp")
        tmp.write_bytes(b"GGUF-version-2")
        os.replace(tmp, path)
        assert m.model("live").read_bytes() == b"GGUF-version-2"
    # Rewritten in place with another size: seen once the kernel's 1 s attribute cache expires.
    path.write_bytes(b"GGUF-version-three")
    time.sleep(1.2)
    assert m.model("live").read_bytes() == b"GGUF-version-three"
    # Unchanged and settled (not modified in the last seconds): the page cache is kept; the log says when it is
    # renewed instead.
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))

    def renewals() -> int:
        return sum("open live" in line and "renewed" in line for line in m.log_text().splitlines())

    time.sleep(1.2)
    m.model("live").read_bytes()
    before = renewals()
    m.model("live").read_bytes()
    assert renewals() == before, m.log_text()


def test_mmap_of_a_local_model(mount, dirs):
    import mmap

    data = gguf_bytes(4 << 20)
    write_model(dirs["store"], "mapped", data)
    m = mount()
    with open(m.model("mapped"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:4] == b"GGUF" and mm[-4096:] == data[-4096:] and mm[:] == data


def test_store_is_created_and_unmount_is_clean(mount, dirs, tmp_path):
    store = tmp_path / "new" / "store"
    m = mount(store=store)
    assert store.is_dir()
    assert os.listdir(m.path) == []
    assert subprocess.run([sys.executable, "-m", "modelfs", "umount", str(m.path)], capture_output=True).returncode == 0
    m.proc.wait(timeout=10)
    assert m.proc.returncode == 0
    assert not os.path.ismount(m.path)


def test_shared_dir_that_is_missing_is_skipped(mount, dirs, tmp_path):
    write_model(dirs["store"], "llama", b"GGUF-local")
    m = mount("--shared", str(tmp_path / "does-not-exist"))
    assert m.model("llama").read_bytes() == b"GGUF-local"
    assert os.listdir(m.path) == ["llama.gguf"]


@pytest.mark.skipif(shutil.which("getfattr") is None, reason="getfattr (package attr) not installed")
def test_xattrs_with_getfattr(mount, dirs):
    write_model(dirs["store"], "llama", b"GGUF-local")
    m = mount()
    out = subprocess.run(["getfattr", "-d", str(m.model("llama"))], capture_output=True, text=True, check=True)
    assert 'user.modelfs.source="local"' in out.stdout


def test_read_ahead_is_raised_after_the_handshake(mount, dirs):
    m = mount()
    with open("/proc/self/mountinfo") as f:
        device = next(line.split()[2] for line in f if line.split()[4] == str(m.path))
    setting = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    os.listdir(m.path)  # the handshake is done once the daemon answers; modelfs sets read-ahead right after it
    wait_for(lambda: setting.read_text().strip() == "4096", timeout=5, what="read_ahead_kb 4096")
    time.sleep(0.5)
    assert setting.read_text().strip() == "4096"  # and nothing resets it afterwards


def test_the_background_daemon_does_not_pin_the_directory_it_was_started_from(dirs, tmp_path):
    """`modelfs mount` without --foreground detaches; the daemon then works from `/`, so the directory it was
    started from (an admin's home, a build tree, a mount) can be removed or unmounted."""
    from tests.support.mount import fuse_missing

    if fuse_missing():
        pytest.skip(fuse_missing() or "")
    started_in = tmp_path / "started-here"
    started_in.mkdir()
    write_model(dirs["store"], "m", b"GGUF-m")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS_", "LLM_"))}
    result = subprocess.run([sys.executable, "-m", "modelfs", "mount", str(dirs["mnt"]), "--store", str(dirs["store"]),
                             "--log-file", str(tmp_path / "daemon.log")], cwd=started_in, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split("(pid ")[1].split(",")[0])
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert (dirs["mnt"] / "m.gguf").read_bytes() == b"GGUF-m"
        started_in.rmdir()  # nothing holds it
    finally:
        subprocess.run([sys.executable, "-m", "modelfs", "umount", str(dirs["mnt"])], capture_output=True, timeout=30)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the daemon to exit")
