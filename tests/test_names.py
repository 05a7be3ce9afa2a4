"""Unit tests of the security boundary: model names and their paths."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from modelfs import layout, names

VALID = ["llama", "org/model", "qwen2.5-7b_q4", "a/b/c", "x.y", "0"]
INVALID = [
    "", "/abs", "trail/", "..", "../x", "a/../b", "a/./b", "a//b", ".hidden", "a/.hidden", "UPPER", "sp ace",
    "nul\0x", "back\\slash", "semi;colon", "é", "a\nb", "%2e%2e", "~user",
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name: str) -> None:
    assert names.validate(name) == name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names(name: str) -> None:
    with pytest.raises(names.InvalidName) as info:
        names.validate(name)
    assert info.value.errno == errno.ENOENT


def test_long_names_are_enametoolong() -> None:
    with pytest.raises(names.InvalidName) as info:
        names.validate("a" * 256)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(names.InvalidName) as info:
        names.component(b"a" * 256)
    assert info.value.errno == errno.ENAMETOOLONG
    assert names.validate("a" * 255) == "a" * 255


def test_components() -> None:
    assert names.component(b"llama.gguf") == "llama.gguf"
    for raw in (b"\xff\xfe", b"a/b"):
        with pytest.raises(names.InvalidName):
            names.component(raw)


def test_model_of_entry() -> None:
    assert names.model_of_entry("", "llama.gguf") == "llama"
    assert names.model_of_entry("org", "model.gguf") == "org/model"
    assert names.model_of_entry("", "llama") is None
    assert names.model_of_entry("", ".gguf") is None
    with pytest.raises(names.InvalidName):
        names.model_of_entry("", "..gguf")


def test_candidates_stay_under_the_root(tmp_path: Path) -> None:
    for name in VALID:
        for path in names.candidates(tmp_path, name):
            assert path.resolve().is_relative_to(tmp_path.resolve())
    with pytest.raises(names.InvalidName):
        names.candidates(tmp_path, "../etc")


def test_inside_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").write_text("x")
    (root / "in").write_text("x")
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "alias").symlink_to(root / "in")
    (root.parent / "rootx").mkdir()  # a sibling whose name starts with the root's
    assert names.inside(root, root / "in")
    assert names.inside(root, root / "alias")
    assert not names.inside(root, root / "out")
    assert not names.inside(root, root.parent / "rootx")


def test_walk_and_locate(tmp_path: Path) -> None:
    (tmp_path / "org" / "m").mkdir(parents=True)
    (tmp_path / "org" / "m" / "model.gguf").write_bytes(b"GGUF1")
    (tmp_path / "org" / "m.gguf").write_bytes(b"GGUF2")  # flat duplicate: the llmlb layout wins
    (tmp_path / "flat.gguf").write_bytes(b"GGUF3")
    (tmp_path / "empty.gguf").write_bytes(b"")  # size 0 is no model (as in llmlb)
    (tmp_path / ".hidden.gguf").write_bytes(b"GGUF4")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".model.gguf.partial").write_bytes(b"GGUF5")
    (tmp_path / "Bad Name.gguf").write_bytes(b"GGUF6")
    found = layout.walk(tmp_path)
    assert sorted(found) == ["flat", "org/m"]
    assert found["org/m"].path.name == "model.gguf"
    assert layout.locate(tmp_path, "org/m").path == tmp_path / "org" / "m" / "model.gguf"
    assert layout.locate(tmp_path, "empty") is None
    assert layout.locate(tmp_path, "x") is None
