"""The blob URL template (`blob_url`): checked when the configuration is read, the name put in as llmlb's route
and a directory export each want it, and a plain HTTP export of a models directory (a real nginx, no llmlb API)
serving a real mount."""

from __future__ import annotations

import json
import os

import pytest

from modelfs import config
from modelfs.router import blob_url
from tests.support.models import gguf_bytes, write_model
from tests.support.procs import wait_for

MB = 1 << 20
EXPORT = "{router}/{name}/model.gguf"


def test_the_default_is_llmlbs_route_with_the_name_as_one_segment():
    default = config.load(env={}).blob_url
    assert default == "{router}/v0/models/blob/{name}"
    assert blob_url(default, "http://r:8080", "org/model") == "http://r:8080/v0/models/blob/org%2Fmodel"


def test_a_name_followed_by_more_path_is_a_path():
    assert blob_url(EXPORT, "http://cdn/models", "org/model") == "http://cdn/models/org/model/model.gguf"
    assert blob_url("{router}/blobs/{name}.gguf", "https://h", "a/b") == "https://h/blobs/a/b.gguf"


def test_a_template_is_read_from_the_environment_and_the_config_file(tmp_path):
    assert config.load(env={"MODELFS_BLOB_URL": EXPORT}).blob_url == EXPORT
    toml = tmp_path / "modelfs.toml"
    toml.write_text(f'blob_url = "{EXPORT}"\nrouter = ["http://a:1"]\n')
    assert config.load(config_file=toml, env={}).blob_url == EXPORT


@pytest.mark.parametrize(("template", "complaint"), [
    ("{router}/v0/models/blob/", "must use {name}"),
    ("http://elsewhere/{name}", "must start with {router}/"),
    ("{router}@evil.example/{name}", "must start with {router}/"),
    ("{router}{name}", "must start with {router}/"),
    ("{router}/{name}/{file}", "no other field"),
    ("{router}/{name!r}", "no other field"),
    ("{router}/{name}#frag", "must start with {router}/"),
    ("{router}/{router}/{name}", "must start with {router}/"),
    ("{router}/a b/{name}", "no spaces"),
    ("{router}/{name", "expected '}'"),
])
def test_a_bad_template_is_a_clear_error(template, complaint):
    with pytest.raises(config.ConfigError) as info:
        config.load(env={"MODELFS_BLOB_URL": template, "MODELFS_ROUTER": "http://a:1"})
    assert "blob_url" in str(info.value) and complaint in str(info.value)


def test_a_template_whose_urls_leave_the_router_is_refused():
    with pytest.raises(config.ConfigError, match="not a path on the router http://a:1"):
        config.load(env={"MODELFS_BLOB_URL": "{router}//{name}", "MODELFS_ROUTER": "http://a:1"})


@pytest.mark.io_paths
def test_a_plain_http_export_of_a_models_directory_serves_a_mount(mount, nginx, tmp_path, dirs, io):
    """nginx serves the router's models directory as files: no blob route, no model list. A top-level model is
    found by HEAD of its URL; a nested one through a list served as a static file; both download in ranged parts."""
    models = tmp_path / "models"
    solo, nested = gguf_bytes(3 * MB + 5), gguf_bytes(4 * MB + 321, seed=4)
    write_model(models, "solo", solo)
    write_model(models, "org/nested", nested)
    (models / "v0").mkdir()
    (models / "v0" / "models").write_text(json.dumps({"data": [{"id": "org/nested", "size_bytes": len(nested)}]}))
    server = nginx(models_dir=models)
    m = mount("--router", server.url, env={"MODELFS_BLOB_URL": EXPORT, "MODELFS_DOWNLOAD_PART_SIZE": "1M"})
    assert os.stat(m.model("solo")).st_size == len(solo)
    assert m.model("solo").read_bytes() == solo
    assert sorted(os.listdir(m.path / "org")) == ["nested.gguf"]
    assert m.model("org/nested").read_bytes() == nested
    for name, data in (("solo", solo), ("org/nested", nested)):
        final = dirs["store"] / name / "model.gguf"
        wait_for(final.exists, what=f"{name} promoted")
        assert final.read_bytes() == data
        with open(m.model(name), "rb"):
            assert os.getxattr(m.model(name), "user.modelfs.io").decode() == io  # complete now: either path
    for name, data in (("solo", solo), ("org/nested", nested)):
        lines = server.log_lines(f"/{name}/model.gguf")
        gets = [line for line in lines if line.startswith("GET ")]
        assert len(gets) >= 3 and all(" 206 " in line for line in gets), lines
        assert sum(int(line.rpartition("body=")[2]) for line in gets) == len(data)
    assert not server.log_lines("/v0/models/blob/solo")  # llmlb's route was never asked
