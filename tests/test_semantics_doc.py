"""Keeps docs/SEMANTICS.md honest: every write operation it lists fails with EROFS on a real mount, and every
operation it lists is one this test knows how to try."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

from tests.support.models import write_model

DOC = Path(__file__).parent.parent / "docs" / "SEMANTICS.md"


def documented_write_ops() -> list[str]:
    text = DOC.read_text()
    section = text.split("### Everything that writes", 1)[1].split("\n## ", 1)[0]
    ops, _, result = section.partition(":")
    assert "`EROFS`" in result
    return re.findall(r"`(\w+)`", ops)


def test_every_documented_write_operation_is_erofs(mount, dirs):
    write_model(dirs["store"], "m", b"GGUF-model")
    m = mount()
    f = m.model("m")
    tries = {
        "create": lambda: os.open(m.path / "new.gguf", os.O_CREAT | os.O_WRONLY, 0o644),
        "write": lambda: os.open(f, os.O_WRONLY),
        "truncate": lambda: os.truncate(f, 0),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(m.path / "x"),
        "mkdir": lambda: os.mkdir(m.path / "x"),
        "rename": lambda: os.rename(f, m.path / "n.gguf"),
        "link": lambda: os.link(f, m.path / "l.gguf"),
        "symlink": lambda: os.symlink("m.gguf", m.path / "s.gguf"),
        "mknod": lambda: os.mknod(m.path / "p.gguf", stat.S_IFIFO | 0o600),
        "chmod": lambda: os.chmod(f, 0o644),
        "chown": lambda: os.chown(f, 0, 0),
        "utime": lambda: os.utime(f, (1, 1)),
        "setxattr": lambda: os.setxattr(f, "user.x", b"y"),
        "removexattr": lambda: os.removexattr(f, "user.modelfs.source"),
    }
    ops = documented_write_ops()
    assert set(ops) <= set(tries), f"SEMANTICS.md lists operations this test cannot try: {set(ops) - set(tries)}"
    for op in ops:
        try:
            tries[op]()
        except OSError as exc:
            # rmdir of a missing directory may be refused as ENOENT before the read-only check.
            assert exc.errno == errno.EROFS or (op == "rmdir" and exc.errno == errno.ENOENT), (op, exc)
        else:
            raise AssertionError(f"{op} succeeded on a read-only mount")
    assert f.read_bytes() == b"GGUF-model"


def test_documented_name_errors(mount, dirs):
    m = mount()
    for bad in ("UPPER.gguf", "sp ace.gguf", ".hidden.gguf", "a" * 250 + ".gguf"):
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / bad)
    with pytest.raises(OSError) as info:
        os.stat(m.path / ("a" * 256))
    assert info.value.errno == errno.ENAMETOOLONG


def test_every_documented_version_case_has_its_test():
    """The table in "Versions" names a test per case; each must exist in tests/test_integrity.py."""
    section = DOC.read_text().split("## Versions: what an open handle reads", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"\| `(test_\w+)` \|", section)
    source = (Path(__file__).parent / "test_integrity.py").read_text()
    assert len(named) >= 6
    missing = [name for name in named if f"def {name}(" not in source]
    assert not missing, f"SEMANTICS.md names tests that do not exist: {missing}"
