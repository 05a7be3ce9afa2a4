"""The router download path through a real mount and a real HTTP router process on loopback: single flight,
streaming reads, resume after a crash, verification, and every fault the router or the disk can throw."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

#: Every read here runs with FUSE passthrough and with the daemon read path.
pytestmark = pytest.mark.io_paths

MB = 1 << 20


def blob_requests(r, name: str) -> list[dict]:
    return [q for q in r.stats()["requests"] if q["method"] == "GET" and q["name"] == name]


def test_router_only_model_is_listed_stat_without_download_then_streamed(mount, router, dirs):
    r = router()
    data = gguf_bytes(3 * MB + 17)
    write_model(r.models_dir, "org/remote", data)
    m = mount("--router", r.url)
    assert os.listdir(m.path) == ["org"] and os.listdir(m.path / "org") == ["remote.gguf"]
    assert os.stat(m.model("org/remote")).st_size == len(data)
    assert os.getxattr(m.model("org/remote"), "user.modelfs.source") == b"router"
    assert r.blob_gets("org/remote") == 0  # listing and stat never download
    assert m.model("org/remote").read_bytes() == data
    final = dirs["store"] / "org" / "remote" / "model.gguf"
    wait_for(final.exists, what="promotion into the store")
    assert final.read_bytes() == data
    # No partial or sidecar left; a marker says modelfs downloaded it (only such models may be evicted). The
    # sidecar goes after the rename and the directory's fsync, so give it a moment.
    wait_for(lambda: sorted(p.name for p in final.parent.iterdir()) == [".modelfs-downloaded", "model.gguf"],
             what="only the model and its marker in the store directory")
    assert os.getxattr(m.model("org/remote"), "user.modelfs.source") == b"local"
    # The mtime is the download's own (so two downloads of a model never share an identity), seen once the
    # kernel's 1 s attribute cache of the mount expires.
    time.sleep(1.1)
    assert os.stat(m.model("org/remote")).st_mtime_ns == final.stat().st_mtime_ns
    assert m.model("org/remote").read_bytes() == data
    opens = [line for line in m.log_text().splitlines() if "open org/remote: local" in line]
    assert opens and "renewed" not in opens[0]  # pages cached while downloading are kept
    assert r.blob_gets("org/remote") == 1 and r.bytes_sent("org/remote") == len(data)
    requests = blob_requests(r, "org/remote")
    assert requests[0]["path"] == "/v0/models/blob/org%2Fremote"


def test_gguf_reader_reads_a_router_served_model(mount, router):
    gguf = pytest.importorskip("gguf")
    from tests.support.ggufmaker import make_gguf

    r = router()
    tensors = make_gguf(r.models_dir / "tiny" / "model.gguf", seed=3, tensor_elems=300_000)
    r.control(rate=2 * MB)  # still downloading while GGUFReader maps and reads it
    m = mount("--router", r.url)
    reader = gguf.GGUFReader(m.model("tiny"))
    got = {t.name: t.data for t in reader.tensors}
    for name, data in tensors.items():
        assert (got[name].reshape(data.shape) == data).all()


def test_32_concurrent_readers_in_separate_processes_share_one_download(mount, router):
    r = router()
    data = gguf_bytes(8 * MB)
    origin = write_model(r.models_dir, "popular", data)
    r.control(rate=16 * MB)
    m = mount("--router", r.url)
    readers = [subprocess.Popen(["cmp", str(m.model("popular")), str(origin)]) for _ in range(32)]
    assert [p.wait(timeout=60) for p in readers] == [0] * 32
    assert r.blob_gets("popular") == 1
    assert r.bytes_sent("popular") <= 1.05 * len(data)


def test_reads_are_served_while_the_download_streams(mount, router, dirs):
    r = router()
    data = gguf_bytes(6 * MB)
    write_model(r.models_dir, "slow", data)
    r.control(rate=1 * MB)  # about 6 s for the whole file
    m = mount("--router", r.url)
    with open(m.model("slow"), "rb") as f:
        head = f.read(4096)
        sent_when_served = r.bytes_sent("slow")
        finished_when_served = (dirs["store"] / "slow" / "model.gguf").exists()
        assert head == data[:4096]
        assert not finished_when_served and sent_when_served < len(data) // 2
        r.control(rate=None)
        assert head + f.read() == data


def test_download_finishes_after_every_opener_closed(mount, router, dirs):
    r = router()
    data = gguf_bytes(4 * MB)
    write_model(r.models_dir, "left", data)
    r.control(rate=4 * MB)
    m = mount("--router", r.url)
    with open(m.model("left"), "rb") as f:
        assert f.read(4) == b"GGUF"
    wait_for((dirs["store"] / "left" / "model.gguf").exists, what="download to finish with no reader")
    assert (dirs["store"] / "left" / "model.gguf").read_bytes() == data


@pytest.mark.parametrize("flavour", ["range", "llmlb"])
def test_kill9_mid_download_then_remount_resumes(mount, router, dirs, flavour):
    r = router(flavour)
    data = gguf_bytes(8 * MB)
    origin = write_model(r.models_dir, "crash", data)
    r.control(rate=4 * MB)
    m = mount("--router", r.url)
    reader = subprocess.Popen(["cat", str(m.model("crash"))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = dirs["store"] / "crash" / ".model.gguf.partial.json"

    def recorded() -> int:  # bytes the resume record claims (it is written once a second, after an fdatasync)
        try:
            return sum(e - s for s, e in json.loads(sidecar.read_text()).get("ranges", []))
        except (OSError, ValueError):
            return 0

    wait_for(lambda: recorded() >= 2 * MB, what="2 MiB downloaded and recorded")
    m.kill9()
    reader.wait(timeout=10)
    kept = recorded()
    assert 0 < kept < len(data)
    r.control(rate=None)
    m2 = mount("--router", r.url)
    assert subprocess.run(["cmp", str(m2.model("crash")), str(origin)]).returncode == 0
    second = blob_requests(r, "crash")[-1]
    assert second["range"] == f"bytes={kept}-"  # one part, its recorded prefix kept
    if flavour == "range":  # a Range-capable server: only the missing bytes travel again
        assert second["if_range"] and second["status"] == 206
        assert second["bytes_sent"] == len(data) - kept
    else:  # llmlb ignores Range: modelfs starts over from byte 0 and still ends correct
        assert second["status"] == 200
    wait_for((dirs["store"] / "crash" / "model.gguf").exists, what="promotion")
    assert (dirs["store"] / "crash" / "model.gguf").read_bytes() == data
    assert "resuming download of crash at byte" in m2.log_text()


@pytest.mark.parametrize("flavour", ["range", "llmlb"])
def test_truncated_body_is_resumed_automatically(mount, router, dirs, flavour):
    r = router(flavour)
    data = gguf_bytes(3 * MB)
    write_model(r.models_dir, "cut", data)
    r.control(truncate_after=MB + 5, truncate_times=1)
    m = mount("--router", r.url)
    assert m.model("cut").read_bytes() == data
    requests = blob_requests(r, "cut")
    assert len(requests) == 2
    assert requests[1]["range"] == f"bytes={MB + 5}-"
    assert requests[1]["status"] == (206 if flavour == "range" else 200)


def test_truncated_every_time_gives_eio_and_keeps_the_partial(mount, router, dirs):
    r = router("range")
    data = gguf_bytes(2 * MB)
    write_model(r.models_dir, "broken", data)
    r.control(truncate_after=100_000)
    m = mount("--router", r.url, "--retries", "2")
    m.expected_errors.append("download of broken failed")
    with pytest.raises(OSError) as info:
        m.model("broken").read_bytes()
    assert info.value.errno == errno.EIO
    assert len(blob_requests(r, "broken")) == 3  # 1 + 2 retries
    assert not (dirs["store"] / "broken" / "model.gguf").exists()  # nothing promoted
    assert (dirs["store"] / "broken" / ".model.gguf.partial").stat().st_size > 0  # kept for the next try
    r.control(truncate_after=None)
    assert m.model("broken").read_bytes() == data


def test_router_404_is_enoent_and_cached(mount, router):
    r = router()
    m = mount("--router", r.url)
    with pytest.raises(FileNotFoundError):
        open(m.model("ghost"), "rb")
    with pytest.raises(FileNotFoundError):
        os.stat(m.model("ghost"))
    heads = [q for q in r.stats()["requests"] if q["name"] == "ghost"]
    assert len(heads) == 1 and heads[0]["method"] == "HEAD"  # the second miss came from the cache
    assert "routers " + r.url + " (404)" in m.log_text()


def test_router_500_gives_eio_with_a_log_line_then_recovers(mount, router):
    r = router()
    data = gguf_bytes(MB)
    write_model(r.models_dir, "flaky", data)
    m = mount("--router", r.url, "--retries", "1")
    m.expected_errors += ["flaky"]
    os.stat(m.model("flaky"))
    r.control(status=500)
    with pytest.raises(OSError) as info:
        m.model("flaky").read_bytes()
    assert info.value.errno == errno.EIO
    errors = [line for line in m.log_text().splitlines() if " ERROR " in line and "flaky" in line]
    assert errors and r.url in errors[-1] and "500" in errors[-1]
    r.control(status=None, fail_first=1)  # one more 500, absorbed by a retry
    assert m.model("flaky").read_bytes() == data


def test_failover_to_the_next_router(mount, router):
    bad, good = router(), router()
    data = gguf_bytes(MB)
    write_model(bad.models_dir, "spread", data)
    write_model(good.models_dir, "spread", data)
    bad.control(status=503)
    m = mount("--router", bad.url, "--router", good.url)
    assert m.model("spread").read_bytes() == data
    assert good.blob_gets("spread") == 1


def test_router_that_hangs_gives_eio_not_a_hang(mount, router):
    r = router()
    write_model(r.models_dir, "stuck", gguf_bytes(MB))
    m = mount("--router", r.url, "--read-timeout", "1", "--retries", "1")
    m.expected_errors += ["stuck"]
    os.stat(m.model("stuck"))
    r.control(hang_body_after=1000)
    reader = subprocess.run(["cat", str(m.model("stuck"))], capture_output=True, timeout=30)
    assert reader.returncode != 0 and b"Input/output error" in reader.stderr
    r.control(hang_body_after=None, hang=True)
    reader = subprocess.run(["cat", str(m.model("stuck"))], capture_output=True, timeout=30)
    assert reader.returncode != 0 and b"Input/output error" in reader.stderr


def test_redirect_to_another_host_is_refused(mount, router):
    r, elsewhere = router(), router()
    write_model(r.models_dir, "moved", gguf_bytes(MB))
    write_model(elsewhere.models_dir, "moved", gguf_bytes(MB))
    r.control(redirect=elsewhere.url)
    m = mount("--router", r.url, "--retries", "0")
    m.expected_errors += ["moved"]
    with pytest.raises(OSError) as info:
        open(m.model("moved"), "rb")
    assert info.value.errno == errno.EIO
    assert "refusing redirect" in m.log_text()
    assert elsewhere.stats()["requests"] == []  # never contacted


def test_token_is_sent_and_never_logged(mount, router):
    r = router(token="s3cret-key")
    data = gguf_bytes(MB)
    write_model(r.models_dir, "private", data)
    m = mount("--router", r.url, env={"MODELFS_ROUTER_TOKEN": "s3cret-key"})
    assert m.model("private").read_bytes() == data
    assert {q["auth"] for q in r.stats()["requests"]} == {"s3cret-key"}
    assert "s3cret" not in m.log_text()
    cmdline = Path(f"/proc/{m.proc.pid}/cmdline").read_bytes()
    assert b"s3cret" not in cmdline


def test_router_down_lists_local_models_quickly(mount, router, dirs):
    r = router()
    write_model(dirs["store"], "here", b"GGUF-here")
    url = r.url
    r.stop()
    m = mount("--router", url)
    started = time.monotonic()
    assert os.listdir(m.path) == ["here.gguf"]
    assert time.monotonic() - started < 5
    assert m.model("here").read_bytes() == b"GGUF-here"


def test_full_store_fails_the_download_not_the_daemon(mount, router, tmp_path):
    store = tmp_path / "tiny-store"
    store.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(store)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        write_model(store, "small", b"GGUF-small")
        r = router()
        write_model(r.models_dir, "huge", gguf_bytes(4 * MB))
        m = mount("--router", r.url, store=store)
        m.expected_errors += ["is full"]
        with pytest.raises(OSError) as info:
            m.model("huge").read_bytes()
        assert info.value.errno in (errno.ENOSPC, errno.EIO)
        assert "is full" in m.log_text()
        assert not (store / "huge" / ".model.gguf.partial").exists()  # removed, the space is back
        assert m.model("small").read_bytes() == b"GGUF-small"
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(store)])


def test_not_gguf_is_never_promoted(mount, router, dirs):
    r = router()
    write_model(r.models_dir, "liar", b"<html>not a model</html>" * 1000)
    m = mount("--router", r.url)
    m.expected_errors += ["not GGUF"]
    with pytest.raises(OSError) as info:  # checked on the first bytes: no reader ever sees them
        m.model("liar").read_bytes()
    assert info.value.errno == errno.EIO
    wait_for(lambda: "not GGUF" in m.log_text(), what="verification log line")
    assert not (dirs["store"] / "liar").exists() or os.listdir(dirs["store"] / "liar") == []


def test_unmount_mid_download_keeps_the_partial(mount, router, dirs):
    r = router("range")
    write_model(r.models_dir, "halfway", gguf_bytes(8 * MB))
    r.control(rate=2 * MB)
    m = mount("--router", r.url)
    with open(m.model("halfway"), "rb") as f:
        f.read(4)
        partial = dirs["store"] / "halfway" / ".model.gguf.partial"
        wait_for(lambda: partial.stat().st_size > MB, what="1 MiB downloaded")
    m.stop()
    assert partial.exists() and partial.stat().st_size > 0
    assert not (dirs["store"] / "halfway" / "model.gguf").exists()


def test_sha256_digest_is_checked_when_the_router_gives_one(mount, router, dirs):
    import base64

    r = router()
    data = gguf_bytes(MB)
    write_model(r.models_dir, "signed", data)
    write_model(r.models_dir, "forged", data)
    good = base64.b64encode(hashlib.sha256(data).digest()).decode()
    bad = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    r.control(headers={"Repr-Digest": f"sha-256=:{good}:"}, models=["signed"])
    m = mount("--router", r.url)
    m.expected_errors += ["SHA-256 differs"]
    assert m.model("signed").read_bytes() == data
    wait_for((dirs["store"] / "signed" / "model.gguf").exists, what="verified model promoted")
    r.control(headers={"Digest": f"sha-256={bad}"}, models=["forged"])
    with open(m.model("forged"), "rb") as f:
        f.read()
    wait_for(lambda: "SHA-256 differs" in m.log_text(), what="digest mismatch")
    assert not (dirs["store"] / "forged" / "model.gguf").exists()


def test_model_on_a_hung_shared_dir_is_downloaded_from_the_router(mount, router, dirs, tmp_path):
    from tests.support.sshfs import Sshd, SshfsMount, sshfs_available

    reason = sshfs_available()
    if reason:
        pytest.skip(reason)
    r = router()
    data = gguf_bytes(2 * MB)
    write_model(r.models_dir, "both", data)
    remote = tmp_path / "remote"
    write_model(remote, "both", data)
    with Sshd() as sshd, SshfsMount(sshd, str(remote), str(tmp_path / "nfs")) as nfs:
        m = mount("--shared", str(tmp_path / "nfs"), "--router", r.url, "--shared-timeout", "1")
        nfs.stop()  # the NFS server dies
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", f"print(open({str(m.model('both'))!r}, 'rb').read() == "
                              f"open({str(r.models_dir / 'both' / 'model.gguf')!r}, 'rb').read())"],
                             capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - started
        nfs.cont()
        assert out.stdout.strip() == "True", out.stderr
        assert r.blob_gets("both") == 1
        assert elapsed < 5  # waited on the dead server at most about its timeout, not forever
        assert "unavailable" in m.log_text()
        fallback = [line for line in m.log_text().splitlines() if "open both" in line]
        assert fallback and "fallback" in fallback[0] and str(tmp_path / "nfs") in fallback[0]


def test_standard_proxy_variables_are_honoured(mount, router, tmp_path):
    r, proxy = router(), router()  # the second stands in for a forward proxy (it answers absolute-form requests)
    data = gguf_bytes(MB)
    write_model(r.models_dir, "via", data)
    write_model(proxy.models_dir, "via", data)
    m = mount("--router", r.url, env={"HTTP_PROXY": proxy.url, "NO_PROXY": ""})
    assert m.model("via").read_bytes() == data
    assert r.stats()["requests"] == []
    paths = {q["path"] for q in proxy.stats()["requests"]}
    assert f"{r.url}/v0/models/blob/via" in paths  # asked for the router's URL, through the proxy
    m.stop()
    direct = mount("--router", r.url, env={"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"},
                   store=tmp_path / "store2")
    assert direct.model("via").read_bytes() == data
    assert r.blob_gets("via") == 1
