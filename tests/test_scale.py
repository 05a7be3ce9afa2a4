"""At scale, through a real mount: listings read one directory level and list exactly the union of the sources,
`modelfs status` reads a directory per request, router lookups answer from the cached model list, and the small
fixes of issue 13 (prefetch waits for promotion, unknown MODELFS_* variables only warn)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs import layout
from modelfs.config import ConfigError, load
from tests.support.models import gguf_bytes, write_model

MB = 1 << 20


def modelfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelfs", *args], capture_output=True, text=True, timeout=timeout)


def grow(root: Path, prefixes: int, per_prefix: int, tag: str) -> dict[str, bytes]:
    """`per_prefix` tiny models under each of `prefixes` org prefixes, some flat; returns name → content."""
    models = {}
    for p in range(prefixes):
        for i in range(per_prefix):
            name = f"org{p}/{tag}{i}"
            data = f"GGUF {tag} {name}".encode()
            write_model(root, name, data, flat=i % 7 == 3)
            models[name] = data
    return models


def expected_listing(names: set[str], prefix: str) -> set[str]:
    start = prefix + "/" if prefix else ""
    entries = set()
    for name in names:
        if name.startswith(start):
            head, slash, _ = name[len(start):].partition("/")
            entries.add(head if slash else head + ".gguf")
    return entries


def test_read_level_reads_one_directory(tmp_path):
    write_model(tmp_path, "org/m", b"GGUF1")
    write_model(tmp_path, "org/m", b"GGUF2", flat=True)  # flat duplicate: the llmlb layout wins
    write_model(tmp_path, "org/flat", b"GGUF3", flat=True)
    write_model(tmp_path, "org/deep/er/model", b"GGUF4")
    write_model(tmp_path, "org/empty", b"", flat=True)  # size 0: no model
    (tmp_path / "org" / "partial").mkdir()
    (tmp_path / "org" / "partial" / ".model.gguf.partial").write_bytes(b"GGUF5")  # only hidden: not listed
    (tmp_path / "org" / "Bad Name.gguf").write_bytes(b"GGUF6")
    (tmp_path / "org" / ".hidden.gguf").write_bytes(b"GGUF7")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.gguf"
    outside.write_bytes(b"GGUF8")
    (tmp_path / "org" / "escape.gguf").symlink_to(outside)
    (tmp_path / "org" / "inside.gguf").symlink_to(tmp_path / "org" / "flat.gguf")
    level = layout.read_level(tmp_path, "org")
    assert sorted(level.models) == ["flat", "inside", "m"]
    assert level.models["m"].path == tmp_path / "org" / "m" / "model.gguf"
    assert level.dirs == {"deep"}
    assert layout.read_level(tmp_path, "") == layout.Level({}, {"org"})
    assert layout.read_level(tmp_path, "nowhere") == layout.Level({}, set())


def test_listings_are_exactly_the_union_of_the_sources(mount, router, dirs):
    store = grow(dirs["store"], 6, 20, "s")
    shared = grow(dirs["shared"], 8, 12, "h")
    write_model(dirs["shared"], "org1/s3", b"GGUF shadowed by the store")  # the store wins
    r = router()
    remote = {"org2/r0": gguf_bytes(1000), "org9/r1": gguf_bytes(2000), "top": gguf_bytes(3000),
              "org0/s0": gguf_bytes(4000)}  # the last one is shadowed by the store
    for name, data in remote.items():
        write_model(r.models_dir, name, data)
    m = mount("--shared", str(dirs["shared"]), "--router", r.url)
    sizes = {**{n: len(d) for n, d in remote.items()}, **{n: len(d) for n, d in shared.items()},
             "org1/s3": len(store["org1/s3"]), **{n: len(d) for n, d in store.items()}}
    names = set(sizes)
    for prefix in ["", *{n.rpartition("/")[0] for n in names}]:
        assert set(os.listdir(m.path / prefix)) == expected_listing(names, prefix), prefix
    found = {}
    for dirpath, _dirs, files in os.walk(m.path):  # what `ls -lR` sees
        for f in files:
            path = Path(dirpath) / f
            found[path.relative_to(m.path).as_posix()[: -len(".gguf")]] = path.stat().st_size
    assert found == sizes
    assert m.model("org1/s3").read_bytes() == store["org1/s3"]
    status = json.loads(modelfs("status", str(m.path), "--json").stdout)
    got = {model["name"]: (model["source"], model["size"]) for model in status["models"]}
    kinds = {**{n: "router" for n in remote}, **{n: "shared" for n in shared}, **{n: "local" for n in store}}
    assert got == {n: (kinds.get(n, "local"), sizes[n]) for n in names}
    assert r.blob_gets("top") == 0  # listings and status never download


def test_unknown_modelfs_variable_warns_and_mounts(mount, dirs):
    write_model(dirs["store"], "m", b"GGUF-m")
    m = mount(env={"MODELFS_PID": "1234"})
    assert m.model("m").read_bytes() == b"GGUF-m"
    lines = [line for line in m.log_text().splitlines() if "MODELFS_PID" in line]
    assert len(lines) == 1 and "ignoring" in lines[0], m.log_text()


def test_unknown_config_file_key_stays_an_error(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("pid = 1\n")
    with pytest.raises(ConfigError, match="pid"):
        load({}, file, {})
    assert load({}, None, {"MODELFS_PID": "1"}).metrics is None


def test_prefetch_returns_only_once_the_model_is_promoted_or_failed(mount, router, dirs):
    r = router()
    good, bad = gguf_bytes(3 * MB), gguf_bytes(2 * MB)
    write_model(r.models_dir, "good", good)
    write_model(r.models_dir, "bad", bad)
    m = mount("--router", r.url, "--retries", "0")
    m.expected_errors += ["SHA-256 differs"]
    digest = base64.b64encode(hashlib.sha256(good).digest()).decode()
    r.control(models=["good"], headers={"Repr-Digest": f"sha-256=:{digest}:"})
    ok = modelfs("prefetch", "good", "--mount", str(m.path))
    assert ok.returncode == 0, ok.stderr
    assert (dirs["store"] / "good" / "model.gguf").read_bytes() == good  # promoted when prefetch returns
    wrong = base64.b64encode(hashlib.sha256(b"another file").digest()).decode()
    r.control(models=["bad"], headers={"Repr-Digest": f"sha-256=:{wrong}:"})
    failed = modelfs("prefetch", "bad", "--mount", str(m.path))
    # Every byte arrived, but the digest fails: that is no completed prefetch.
    assert failed.returncode == 1 and "SHA-256" in failed.stderr, failed.stderr
    assert not (dirs["store"] / "bad" / "model.gguf").exists()


def test_router_lookup_answers_from_the_list_while_the_router_stalls(mount, router, dirs):
    r = router()
    write_model(r.models_dir, "org/listed", gguf_bytes(MB))
    m = mount("--router", r.url, env={"MODELFS_ROUTER_LIST_TTL": "0.5", "MODELFS_NEGATIVE_CACHE_TTL": "0.1"})
    assert os.listdir(m.path / "org") == ["listed.gguf"]  # the list is fetched once
    write_model(r.models_dir, "org/new", gguf_bytes(2 * MB))  # not in the list yet
    time.sleep(1.0)  # the list is now past its TTL
    r.control(hang=True, list_hang=True)  # blob HEAD/GET and the list all stall
    try:
        started = time.monotonic()
        assert os.stat(m.model("org/listed")).st_size == MB  # from the stale list, no wait on the router
        assert time.monotonic() - started < 0.5
        assert [q for q in r.stats()["requests"] if q["method"] == "HEAD"] == []
        r.control(hang=None)  # blobs answer again; the list still stalls
        assert os.stat(m.model("org/new")).st_size == 2 * MB  # a name the list lacks: asked with a HEAD
        assert [q["name"] for q in r.stats()["requests"] if q["method"] == "HEAD"] == ["org/new"]
    finally:
        r.control(hang=None, list_hang=None)
